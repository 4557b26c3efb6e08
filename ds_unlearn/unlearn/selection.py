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
) -> list[list[list[Slot]]]:
    """Deal the selected rows evenly over every rank's micro-batches for one epoch.

    Returns ``plan[rank][micro_batch] -> slots``. Every rank gets exactly
    ``micro_batches_per_rank`` micro-batches (ZeRO-3 needs equal call counts), each holding at
    least one slot; compute follows the number of selected rows. Weights make the accumulated,
    rank-averaged gradient of each optimizer step equal the gradient of the mean loss over that
    step's real rows: weight = world_size / (real rows in the step).
    """
    if not selected:
        raise ValueError("plan_epoch needs at least one selected row")
    slots = world_size * micro_batches_per_rank
    buckets: list[list[int]] = [[] for _ in range(slots)]
    # Deal to optimizer steps first, then ranks, then micro-batches within a step: every step
    # gets rows while there are at least as many rows as steps.
    steps = -(-micro_batches_per_rank // grad_accum)
    order = [
        (step * grad_accum + within // world_size) * world_size + within % world_size
        for within in range(grad_accum * world_size)
        for step in range(steps)
        if step * grad_accum + within // world_size < micro_batches_per_rank
    ]
    for i, index in enumerate(selected):
        buckets[order[i % slots]].append(index)
    plan = [[[] for _ in range(micro_batches_per_rank)] for _ in range(world_size)]
    for step_start in range(0, micro_batches_per_rank, grad_accum):
        step_micro = range(step_start, min(step_start + grad_accum, micro_batches_per_rank))
        real = sum(len(buckets[m * world_size + r]) for m in step_micro for r in range(world_size))
        weight = world_size / real if real else 0.0
        for m in step_micro:
            for r in range(world_size):
                rows = buckets[m * world_size + r]
                plan[r][m] = [Slot(i, weight) for i in rows] or [Slot(selected[0], 0.0)]
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
