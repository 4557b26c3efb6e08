"""SequenceTrainer: steps without real rows never move a weight, even with Adam momentum."""

import torch
from transformers import TrainerCallback, TrainingArguments

from ds_unlearn.core.toy import random_sequences, tiny_model
from ds_unlearn.unlearn.loop import SequenceTrainer


class FirstEpochOnly(SequenceTrainer):
    """Trains every row in epoch 1 and nothing after (as SGA does once its selection is empty)."""

    def epoch_rows(self):
        return list(range(len(self.train_dataset))) if self.state.epoch < 1 else []


class WeightsAtEpochEnd(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_filler_only_steps_leave_the_weights_alone(tmp_path):
    model = tiny_model("llama", vocab_size=64)
    seen = WeightsAtEpochEnd()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        num_train_epochs=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = FirstEpochOnly(model=model, args=args, train_sequences=random_sequences(4, 12, 64), callbacks=[seen])
    trainer.train()
    first, second, third = seen.weights
    initial = tiny_model("llama", vocab_size=64).state_dict()
    assert any(not torch.equal(first[k], initial[k]) for k in first)  # epoch 1 trained (4 steps)
    assert all(torch.equal(first[k], second[k]) and torch.equal(second[k], third[k]) for k in first)
