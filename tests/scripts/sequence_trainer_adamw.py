"""Train a tiny model with ``SequenceTrainer`` on a fixed selection and save its final weights
(tests/test_training.py compares them with a hand-written AdamW).

    python tests/scripts/sequence_trainer_adamw.py OUT.pt BATCH [DEEPSPEED_JSON]
    deepspeed --num_accelerators 2 tests/scripts/sequence_trainer_adamw.py OUT.pt BATCH configs/ds/zero2.json
"""

import sys

import torch

from ds_unlearn.commands import process
from ds_unlearn.core import distributed as D
from ds_unlearn.core.toy import random_sequences, tiny_model
from ds_unlearn.unlearn.loop import SequenceTrainer

SELECTED = [2, 0]  # two of four rows, as SGA might select them
EPOCHS, LR = 3, 1e-2


class Selection(SequenceTrainer):
    def epoch_rows(self):
        return list(SELECTED)


def training_arguments(out_dir: str, batch: int, deepspeed: str | None):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        deepspeed=deepspeed,
    )
    process.configure_process_for_trainer(settings)
    return TrainingArguments(**settings)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, batch, deepspeed = args[0], int(args[1]), (args[2] if len(args) > 2 else None)
    process.init_distributed()
    targs = training_arguments(out + ".dir", batch, deepspeed)
    model = tiny_model("llama", seed=0, vocab_size=64)
    trainer = Selection(model=model, args=targs, train_sequences=random_sequences(4, 12, 64, seed=5))
    trainer.train()
    if deepspeed:
        import deepspeed as ds

        params = list(trainer.model.parameters())
        with ds.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    else:
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    if D.is_main():
        torch.save({"state": state, "steps": trainer.state.global_step}, out)
    process.finalize()


if __name__ == "__main__":
    main()
