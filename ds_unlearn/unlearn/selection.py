"""Pure decisions of an unlearning run: which sequences to train on, how to deal them to ranks,
and when a forget set counts as unlearned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.summary import Thresholds


def sga_selection(scores: Sequence[float], gamma: float) -> list[int]:
    """Selective GA: the rows scoring at or above ``gamma``, plus always the most memorized one
    (so ascent never stalls while something is still the forget set's worst case)."""
    scores = np.asarray(scores, dtype=np.float64)
    chosen = set(np.flatnonzero(scores >= gamma).tolist())
    chosen.add(int(np.argmax(scores)))
    return sorted(chosen)


@dataclass(frozen=True)
class Slot:
    """One row of one micro-batch: a dataset index and its loss weight (0 for a filler row that
    only keeps the number of forward/backward calls equal across ranks)."""

    index: int
    weight: float


def steps_with_rows(plan: list[list[list[Slot]]], grad_accum: int) -> list[bool]:
    """Per optimizer step of an epoch plan: does any rank train a real row in it?"""
    micro_batches = len(plan[0])
    return [
        any(slot.weight > 0 for rank in plan for mb in rank[start : start + grad_accum] for slot in mb)
        for start in range(0, micro_batches, grad_accum)
    ]


def plan_epoch(
    selected: Sequence[int],
    world_size: int,
    micro_batches_per_rank: int,
    grad_accum: int,
    rows_per_micro_batch: int,
) -> list[list[list[Slot]]]:
    """Deal the selected rows to one epoch's optimizer steps, ranks and micro-batches.

    An optimizer step holds up to ``world_size * grad_accum * rows_per_micro_batch`` rows; the
    rows fill the first steps in order (a selection of k rows takes ceil(k / that) steps, as in
    the paper's setting where one step covers the whole forget set), and within a step they are
    spread round-robin over ranks, then micro-batches, so compute stays balanced. So a selection
    gives the same optimizer steps whatever the split of a step over ranks and micro-batches.

    Returns ``plan[rank][micro_batch] -> slots``. Every rank gets exactly
    ``micro_batches_per_rank`` micro-batches (ZeRO-3 needs equal call counts), each holding at
    least one slot (a zero-weight filler where it has no row); steps after the last real row hold
    fillers only (``EpochPlanSampler`` does not run them). Weights make the accumulated,
    rank-averaged gradient of each optimizer step the gradient of the mean loss over that step's
    real rows: weight = world_size / (real rows in the step). Raises ValueError on no rows or on
    more rows than the epoch can hold.
    """
    if not selected:
        raise ValueError("plan_epoch needs at least one selected row")
    slots_per_step = world_size * grad_accum
    capacity = slots_per_step * rows_per_micro_batch
    steps = micro_batches_per_rank // grad_accum
    if len(selected) > steps * capacity:
        raise ValueError(f"{len(selected)} rows do not fit in {steps} steps of {capacity}")
    # buckets[rank][micro_batch]
    buckets: list[list[list[int]]] = [[[] for _ in range(micro_batches_per_rank)] for _ in range(world_size)]
    for i, index in enumerate(selected):
        step, within = divmod(i, capacity)
        slot = within % slots_per_step
        buckets[slot % world_size][step * grad_accum + slot // world_size].append(index)
    plan = [[[] for _ in range(micro_batches_per_rank)] for _ in range(world_size)]
    for step in range(steps):
        micro = range(step * grad_accum, (step + 1) * grad_accum)
        real = sum(len(buckets[r][m]) for m in micro for r in range(world_size))
        weight = world_size / real if real else 0.0
        for m in micro:
            for r in range(world_size):
                plan[r][m] = [Slot(i, weight) for i in buckets[r][m]] or [Slot(selected[0], 0.0)]
    return plan


def stop_satisfied(ma_values: Sequence[float], rule: str, thresholds: Thresholds) -> bool:
    """``per_sequence``: no sequence is memorized any more. ``mean``: the forget set's mean MA
    fell below the threshold (the papers' baseline rule, which can leave sequences extractable)."""
    ma = np.asarray(ma_values, dtype=np.float64)
    if rule == "per_sequence":
        return bool(np.all(ma < thresholds.memorized_ma))
    if rule == "mean":
        return bool(ma.mean() < thresholds.mean_ma)
    raise ValueError(f"unknown stop rule {rule!r}")
