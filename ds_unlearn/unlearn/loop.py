"""Sequence-level training on top of ``transformers.Trainer``, shared by unlearning and the lab.

``SequenceTrainer`` trains on token-id sequences where each epoch's rows, their loss terms and
weights, come from a plan (``selection.plan_epoch``): every rank runs the same number of
micro-batches, compute goes only to planned rows, and the loss is a per-sequence weighted sum of
each row's term (``losses.TERMS``: descend, ascend, npo, kl), so one micro-batch may ascend some
rows and descend others. Subclasses decide the rows (``epoch_rows``), their terms
(``row_terms``) and any extra per-row loss (``extra_row_losses``); everything else is the
upstream Trainer and its DeepSpeed integration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback

from ..core import distributed as D
from ..core.passes import PAD_ID
from .losses import IGNORE, TERM_CODE, per_sequence_nll, row_losses, weighted_objective
from .reporting import use_grouped_tensorboard
from .selection import Slot, plan_epoch, steps_with_rows

FILLER_TOKENS = 2  # a zero-weight filler row only has to exist, not to be long


class SlotDataset(Dataset):
    """Token sequences addressed by ``Slot`` (index + loss weight); ``prompts``: each one's
    prompt length (its first tokens condition the rest but are never trained on)."""

    def __init__(self, sequences: Sequence[Sequence[int]], prompts: Sequence[int] | None = None):
        self.sequences = [list(s) for s in sequences]
        self.prompts = [0] * len(self.sequences) if prompts is None else [int(p) for p in prompts]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, slot: Slot) -> dict:
        tokens, prompt = self.sequences[slot.index], self.prompts[slot.index]
        if slot.weight == 0.0:
            tokens, prompt = tokens[:FILLER_TOKENS], 0
        return {
            "input_ids": tokens,
            "prompt_length": prompt,
            "row_index": slot.index,
            "weight": slot.weight,
            "term": TERM_CODE[slot.term],
        }


def collate_sequences(rows: list[dict]) -> dict:
    """Right-pad; labels ignore padding and each row's prompt (``prompt_length``, default 0: its
    first tokens are attended to but never predicted, so every loss term covers the response
    only); row indices and weights travel with the batch."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
        prompt = row.get("prompt_length", 0)
        labels[i, prompt : len(row["input_ids"])] = ids[i, prompt : len(row["input_ids"])]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "row_index": torch.tensor([r["row_index"] for r in rows]),
        "weight": torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
        "term": torch.tensor([r["term"] for r in rows]),
    }


class EpochPlanSampler:
    """Yields this rank's micro-batches of the current epoch; the plan is built when the epoch
    starts, so a selection made at the end of the previous epoch takes effect at once.

    Only optimizer steps that train a real row are yielded. A step of zero-weight fillers alone
    would still move Adam (its moments decay, its step count advances), so SGA's result would
    depend on the batch size and the world size; the plan puts every real row before the first
    empty step, and the epoch simply ends after the last real one (the same on every rank, so
    ZeRO-3's collective calls stay in step). An epoch with no row at all yields nothing, which
    ends training (the Trainer's own rule for an empty epoch)."""

    def __init__(self, trainer: SequenceTrainer):
        self.trainer = trainer

    def __len__(self) -> int:
        return self.trainer.micro_batches_per_rank  # an upper bound: see __iter__

    def __iter__(self):
        rows = self.trainer.epoch_rows()
        if not rows:
            self.trainer.epoch_steps_with_rows = []
            return iter(())
        grad_accum = self.trainer.args.gradient_accumulation_steps
        terms, scales = self.trainer.row_terms(rows)
        plan = plan_epoch(
            rows, D.world_size(), len(self), grad_accum, self.trainer.args.per_device_train_batch_size, terms, scales
        )
        with_rows = steps_with_rows(plan, grad_accum)
        steps = max(i for i, has in enumerate(with_rows) if has) + 1
        assert all(with_rows[:steps]), "plan_epoch fills the first steps"
        self.trainer.epoch_steps_with_rows = with_rows[:steps]
        return iter(plan[D.rank()][: steps * grad_accum])


class ScaledSteps(TrainerCallback):
    """Each optimizer step runs at the scheduler's rate times ``trainer.lr_factor()`` (smaller
    steps as sequences approach the band); the scheduler sets the rate again after the step."""

    def __init__(self, trainer: SequenceTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        factor = self.trainer.lr_factor()
        if factor != 1.0:
            for group in self.trainer.optimizer.param_groups:
                group["lr"] = group["lr"] * factor


class SequenceTrainer(Trainer):
    """A Trainer over a list of token sequences with per-sequence weighted NLL."""

    def __init__(
        self, *args, train_sequences: Sequence[Sequence[int]], train_prompts: Sequence[int] | None = None, **kwargs
    ):
        kwargs.setdefault("data_collator", collate_sequences)
        super().__init__(*args, train_dataset=SlotDataset(train_sequences, train_prompts), **kwargs)
        self.epoch_steps_with_rows: list[bool] = []
        self.add_callback(ScaledSteps(self))
        use_grouped_tensorboard(self)
        # Our weights already normalize over micro-batches and ranks: no extra division by GA.
        self.loss_is_scaled_for_ga = True
        self.forward_ma: dict[int, float] = {}  # per-sequence MA seen by training forward passes
        self.nonfinite_loss = False

    def _issue_warnings_after_load(self, load_result) -> None:
        """A tied weight (``lm_head.weight`` sharing the embeddings) is not saved in a checkpoint, so
        loading one to resume reports it "missing" although it is the loaded embedding: drop those
        keys before transformers warns about the rest."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
        if tied and hasattr(load_result, "_replace"):
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    @property
    def micro_batches_per_rank(self) -> int:
        """Enough micro-batches to hold every sequence once, rounded to whole optimizer steps."""
        per_step = D.world_size() * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return math.ceil(len(self.train_dataset) / per_step) * self.args.gradient_accumulation_steps

    # -- what subclasses decide -------------------------------------------------------------
    def epoch_rows(self) -> list[int]:
        """Dataset indices to train on this epoch (all of them by default; empty trains nothing)."""
        return list(range(len(self.train_dataset)))

    def row_terms(self, rows: list[int]) -> tuple[list[str], list[float]]:
        """Each row's loss term and weight scale, parallel to ``rows`` (default: descend, 1)."""
        return ["descend"] * len(rows), [1.0] * len(rows)

    def extra_row_losses(self, rows: torch.Tensor, terms: torch.Tensor, logits, labels, nll) -> dict:
        """Per-row values of the terms beyond descend/ascend (``{"npo": [B], "kl": [B]}``)."""
        return {}

    def lr_factor(self) -> float:
        """Factor on the learning rate of this epoch's steps (the scheduler resets it each step)."""
        return 1.0

    # -- thin overrides -----------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        # Rank-local already (see EpochPlanSampler), so it is not handed to accelerate to shard.
        return DataLoader(
            self.train_dataset,
            batch_sampler=EpochPlanSampler(self),
            collate_fn=self.data_collator,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Per-sequence weighted terms (each row ascended, descended, NPO or KL) instead of the
        # model's token mean.
        weights, rows, labels = inputs.pop("weight"), inputs.pop("row_index"), inputs.pop("labels")
        terms = inputs.pop("term")
        outputs = model(**inputs, use_cache=False)
        nll, ma = per_sequence_nll(outputs.logits, labels)
        for row, weight, value in zip(rows.tolist(), weights.tolist(), ma.tolist()):
            if weight != 0:
                self.forward_ma[row] = value
        extra = self.extra_row_losses(rows, terms, outputs.logits, labels, nll)
        losses = row_losses(terms.to(nll.device), nll, **extra)
        loss = weighted_objective(losses, weights.to(nll.device))
        if not torch.isfinite(loss.detach()):
            self.nonfinite_loss = True
        return (loss, outputs) if return_outputs else loss
