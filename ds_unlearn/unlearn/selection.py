"""Pure decisions of an unlearning run: which sequences to train on, how to deal them to ranks,
and when a forget set counts as unlearned."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.verdict import IN_BAND, MEMORIZED, OVER_UNLEARNED, Thresholds


def sga_selection(scores: Sequence[float], gamma: float) -> list[int]:
    """Selective GA: the rows scoring at or above ``gamma``, plus always the most memorized one
    (so ascent never stalls while something is still the forget set's worst case)."""
    scores = np.asarray(scores, dtype=np.float64)
    chosen = set(np.flatnonzero(scores >= gamma).tolist())
    chosen.add(int(np.argmax(scores)))
    return sorted(chosen)


ASCEND, LEAVE, PULL_BACK = MEMORIZED, IN_BAND, OVER_UNLEARNED


def band_directions(rows: Sequence[Mapping[str, float]], thresholds: Thresholds) -> list[int]:
    """Place every forget sequence against the holdout's distribution (two-sided control), by the
    one verdict (``Thresholds.sides`` over ``band_on``; ``rows``: per-sequence score dicts).

    ``ASCEND`` (1): outside the band on the member side, still memorized, unlearn it; ``LEAVE``
    (0): inside the band, where text the model never saw sits, train nothing on it; ``PULL_BACK``
    (-1): outside on the other side, pushed where a membership attack spots it, so it is descended
    (its NLL minimized) until it is back inside. Descending a sequence that already lies below
    ordinary text is the simplest pull-back that needs no target: it stops by itself once the next
    judgement finds it in the band."""
    return thresholds.sides(rows).tolist()


@dataclass(frozen=True)
class Slot:
    """One row of one micro-batch: a dataset index, its loss weight (0 for a filler row that
    only keeps the number of forward/backward calls equal across ranks) and its loss term
    (``losses.TERMS``: descend, ascend, npo or kl)."""

    index: int
    weight: float
    term: str = "descend"


def steps_with_rows(plan: list[list[list[Slot]]], grad_accum: int) -> list[bool]:
    """Per optimizer step of an epoch plan: does any rank train a real row in it?"""
    micro_batches = len(plan[0])
    return [
        any(slot.weight != 0 for rank in plan for mb in rank[start : start + grad_accum] for slot in mb)
        for start in range(0, micro_batches, grad_accum)
    ]


def plan_epoch(
    selected: Sequence[int],
    world_size: int,
    micro_batches_per_rank: int,
    grad_accum: int,
    rows_per_micro_batch: int,
    terms: Sequence[str] | None = None,
    scales: Sequence[float] | None = None,
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
    real rows: weight = world_size / (real rows in the step), times the row's ``scales`` entry
    (default 1; GradDiff's retain weight, for example). ``terms`` (parallel to ``selected``,
    default all "descend") says which loss each row takes. Raises ValueError on no rows, on
    more rows than the epoch can hold, or on terms/scales not parallel to ``selected``.
    """
    if not selected:
        raise ValueError("plan_epoch needs at least one selected row")
    terms = list(terms) if terms is not None else ["descend"] * len(selected)
    scales = list(scales) if scales is not None else [1.0] * len(selected)
    if not len(terms) == len(scales) == len(selected):
        raise ValueError("plan_epoch: terms and scales must be parallel to selected")
    row_of = {index: (term, scale) for index, term, scale in zip(selected, terms, scales)}
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
                rows = buckets[r][m]
                plan[r][m] = [Slot(i, weight * row_of[i][1], row_of[i][0]) for i in rows] or [Slot(selected[0], 0.0)]
    return plan


def rank_matched_targets(losses: Sequence[float], nonmember_losses: Sequence[float]) -> np.ndarray:
    """Each forget sequence's target loss for the ``match`` method: the non-members' loss at the
    sequence's own rank.

    ``losses``: [n] the forget set's mean token NLLs (nats) under the current weights;
    ``nonmember_losses``: [m] those of text drawn like the forget set that the model never saw,
    under the same weights. The forget sequence of mid-rank ``r`` (0-based, ties broken by index)
    gets the non-members' ``(r + 0.5) / n`` quantile (``numpy.quantile``, linear). So a forget
    set that reaches its targets has the non-members' loss distribution, where a loss attack reads
    AUC 0.5 (a retrained model's, which never saw either), while each sequence moves as little as
    its place in the order allows: the hardest-to-predict record goes to the hardest non-member's
    level, not into one common band. Returns float64 [n]. Raises ValueError on an empty set."""
    ranks, reference = _rank_positions(losses, nonmember_losses, "rank_matched_targets")
    return np.quantile(reference, ranks)


def _rank_positions(losses, nonmember_losses, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """Each forget sequence's mid-rank position ``(r + 0.5) / n`` (ties broken by index), and the
    non-members' losses, both float64. Raises ValueError naming ``caller`` on an empty set."""
    losses = np.asarray(losses, dtype=np.float64)
    reference = np.asarray(nonmember_losses, dtype=np.float64)
    if losses.size == 0 or reference.size == 0:
        raise ValueError(f"{caller} needs forget and non-member losses")
    ranks = np.empty(losses.size)
    ranks[np.argsort(losses, kind="stable")] = (np.arange(losses.size) + 0.5) / losses.size
    return ranks, reference


def rank_matched_sources(losses: Sequence[float], nonmember_losses: Sequence[float]) -> np.ndarray:
    """For ``match_target tokens``: the non-member each forget sequence takes its token-loss profile
    from, by rank. The forget sequence of mid-rank ``r`` among ``n`` (ties broken by index, as
    ``rank_matched_targets``) gets the non-member at the ``(r + 0.5) / n`` position of the
    non-members ordered by loss (the nearest below it: int(position * m)). ``losses`` [n],
    ``nonmember_losses`` [m]: mean token NLLs (nats). Returns int64 [n] indices into the
    non-members. Raises ValueError on an empty set."""
    ranks, reference = _rank_positions(losses, nonmember_losses, "rank_matched_sources")
    order = np.argsort(reference, kind="stable")
    return order[np.minimum((ranks * reference.size).astype(np.int64), reference.size - 1)]


def profile_targets(profile: Sequence[float], n: int) -> np.ndarray:
    """A token-loss profile resampled to ``n`` positions: the ``(j + 0.5) / n`` quantiles
    (``numpy.quantile``, linear) of ``profile`` (one non-member's token NLLs, nats), ascending.
    float64 [n]; the mean stays close to the profile's mean. Raises ValueError on an empty profile."""
    values = np.asarray(profile, dtype=np.float64)
    if values.size == 0:
        raise ValueError("profile_targets needs a non-empty profile")
    return np.quantile(values, (np.arange(n) + 0.5) / n)


def match_plan(losses: Sequence[float], targets: Sequence[float]) -> tuple[list[int], list[int], list[float]]:
    """The ``match`` method's epoch: the gradient of ``sum_i (loss_i - target_i)^2 / 2`` written as
    the trainer's row terms. A sequence below its target (still more likely than text the model
    never saw) ascends, one above it descends, each weighted by its distance ``|loss_i - target_i|``
    (nats), so sequences near their target barely move and none is pushed past it the way GA
    pushes the last memorized one. Returns (ascend rows, descend rows, per-row scale [n])."""
    gap = np.asarray(targets, dtype=np.float64) - np.asarray(losses, dtype=np.float64)
    ascend = [int(i) for i in np.flatnonzero(gap > 0)]
    descend = [int(i) for i in np.flatnonzero(gap < 0)]
    return ascend, descend, np.abs(gap).tolist()


def stop_satisfied(
    rows: Sequence[Mapping[str, float]],
    rule: str,
    thresholds: Thresholds,
    max_over_unlearned: int = 0,
    match_auc: float | None = None,
    match_margin: float = 0.05,
) -> bool:
    """``band``: no sequence is memorized and at most ``max_over_unlearned`` are over-unlearned
    (the ICML paper counts both as failures). ``per_sequence``: no sequence is memorized any more.
    ``mean``: the forget set's mean MA fell below the threshold (the papers' baseline rule, which
    can leave sequences extractable). ``match``: the band rule holds and the loss attack's AUC,
    forget set against the match non-members under the current weights (``match_auc``), is
    within ``match_margin`` of 0.5. ``rows``: per-sequence score dicts (``ma`` and every
    ``band_on`` score)."""
    if rule == "mean":
        return bool(np.mean([float(r["ma"]) for r in rows]) < thresholds.mean_ma)
    if rule not in ("band", "per_sequence", "match"):
        raise ValueError(f"unknown stop rule {rule!r}")
    sides = thresholds.sides(rows)
    if rule == "match":
        if match_auc is None:
            raise ValueError("the match stop rule needs match_auc")
        in_band = bool(np.all(sides != MEMORIZED)) and int(np.sum(sides == OVER_UNLEARNED)) <= max_over_unlearned
        return in_band and abs(match_auc - 0.5) <= match_margin
    if rule == "band":
        return bool(np.all(sides != MEMORIZED)) and int(np.sum(sides == OVER_UNLEARNED)) <= max_over_unlearned
    return bool(np.all(sides != MEMORIZED))


def epoch_rank(
    memorized: int, over_unlearned: int, stop_holds: bool, holdout_loss: float | None, distance: float = 0.0
) -> tuple:
    """Sort key of a judged epoch, smaller is better: one where the stop rule holds first, then
    the fewest outliers (memorized + over-unlearned), then the smallest ``distance`` (the match
    method's |AUC - 0.5|; 0 for every other method), then the lowest holdout loss (NaN or unknown
    last). The run outputs the weights of its best epoch, not of its last."""
    loss = float("inf") if holdout_loss is None or not np.isfinite(holdout_loss) else float(holdout_loss)
    return (not stop_holds, memorized + over_unlearned, float(distance), loss)


def step_scale(ascending_rows: int, forget_size: int, floor: float) -> float:
    """Learning-rate factor of an ascent step that trains ``ascending_rows`` of ``forget_size``
    sequences: the selected fraction, never below ``floor``. Adam's step size does not shrink
    with the gradient, so without this the last memorized sequence of a set takes full steps
    and overshoots the band, dragging its neighbours (same templates) below it."""
    if forget_size <= 0:
        return 1.0
    return float(min(1.0, max(floor, ascending_rows / forget_size)))


def collapsed(holdout_loss_before: float | None, holdout_loss: float | None, vocab_size: int) -> bool:
    """True when the holdout loss (mean nats per token) has risen from below to at least ln(vocab):
    the model now predicts text it never trained on no better than a uniform guess over its
    vocabulary, i.e. the weights were destroyed (an extreme learning rate drives every logit to
    the same value or to huge wrong ones without any NaN). A model that was already no better
    than that on its holdout (a tiny model on random tokens) is never judged by it. The 0.1% margin
    absorbs the rounding of a mean of exactly ln(vocab)."""
    if holdout_loss_before is None or holdout_loss is None:
        return False
    uniform = math.log(vocab_size)
    return holdout_loss_before < uniform and holdout_loss >= uniform * (1 - 1e-3)
