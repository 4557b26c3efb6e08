"""The pure pieces of unlearning: selection, epoch plans, stop rules, calibration, losses."""

import pytest
import torch

from ds_unlearn.core.summary import Thresholds, calibrate_thresholds
from ds_unlearn.unlearn.losses import negated_task_vector, per_sequence_nll, weighted_objective
from ds_unlearn.unlearn.selection import (
    Slot,
    plan_epoch,
    sga_selection,
    stop_satisfied,
)


def test_sga_selects_above_gamma_plus_the_most_memorized():
    assert sga_selection([0.9, 0.2, 0.7, 0.69], gamma=0.7) == [0, 2]
    assert sga_selection([0.1, 0.5, 0.3], gamma=0.7) == [1]  # nothing above: still the worst case
    assert sga_selection([0.1, 0.5], gamma=0.0) == [0, 1]  # gamma 0 is plain GA


def test_plan_deals_rows_evenly_with_equal_micro_batch_counts_and_exact_weights():
    plan = plan_epoch(list(range(5)), world_size=2, micro_batches_per_rank=2, grad_accum=2, rows_per_micro_batch=2)
    assert [len(rank) for rank in plan] == [2, 2]
    real = sorted(s.index for rank in plan for mb in rank for s in mb if s.weight > 0)
    assert real == [0, 1, 2, 3, 4]
    # One optimizer step holds all 5 rows: weight = world / rows, so the rank-averaged sum of
    # weighted losses is the mean over the 5 rows.
    assert all(s.weight == pytest.approx(2 / 5) for rank in plan for mb in rank for s in mb)
    assert sum(s.weight for rank in plan for mb in rank for s in mb) / 2 == pytest.approx(1.0)


def test_plan_fills_empty_micro_batches_with_zero_weight_rows():
    plan = plan_epoch([7], world_size=2, micro_batches_per_rank=1, grad_accum=1, rows_per_micro_batch=1)
    assert plan == [[[Slot(7, 2.0)]], [[Slot(7, 0.0)]]]


def test_plan_normalizes_each_optimizer_step_separately():
    plan = plan_epoch(list(range(6)), world_size=1, micro_batches_per_rank=2, grad_accum=1, rows_per_micro_batch=3)
    assert [[s.index for s in mb] for mb in plan[0]] == [[0, 1, 2], [3, 4, 5]]
    assert all(s.weight == pytest.approx(1 / 3) for mb in plan[0] for s in mb)


def test_stop_rules():
    t = Thresholds(memorized_ma=0.6, over_unlearned_ma=0.15, mean_ma=0.3)
    assert stop_satisfied([0.1, 0.59], "per_sequence", t)
    assert not stop_satisfied([0.0, 0.0, 0.6], "per_sequence", t)
    # The mean rule is fooled by one sequence that stays fully memorized (the paper's point).
    assert stop_satisfied([0.0, 0.0, 0.0, 0.9], "mean", t)


def test_calibration_from_holdout_quantiles():
    t = calibrate_thresholds([0.1, 0.2, 0.3, 0.4, 0.5], quantile=0.25)
    assert (t.over_unlearned_ma, t.memorized_ma, t.mean_ma) == pytest.approx((0.2, 0.4, 0.3))


def test_per_sequence_nll_by_hand():
    # Vocabulary of 2; logits favour token 0 with log-odds ln 3 (p = 3/4).
    logit = torch.log(torch.tensor([3.0, 1.0]))
    logits = logit.repeat(2, 3, 1)
    labels = torch.tensor([[0, 0, 1], [1, 0, -100]])
    nll, ma = per_sequence_nll(logits, labels)
    p0, p1 = -torch.log(torch.tensor(0.75)), -torch.log(torch.tensor(0.25))
    assert nll.tolist() == pytest.approx([((p0 + p1) / 2).item(), p0.item()])  # padding never counts
    assert ma.tolist() == pytest.approx([0.5, 1.0])


def test_weighted_objective_and_task_vector():
    nll = torch.tensor([2.0, 4.0])
    w = torch.tensor([0.5, 0.25])
    assert weighted_objective(nll, w, ascend=False).item() == pytest.approx(2.0)
    assert weighted_objective(nll, w, ascend=True).item() == pytest.approx(-2.0)
    base, current = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    assert negated_task_vector(current, base, 3.0).tolist() == pytest.approx([-0.5, 5.0])


def test_plan_fills_the_first_steps_and_balances_ranks():
    from ds_unlearn.unlearn.selection import steps_with_rows

    # 2 ranks x 4 micro-batches of 1 row, one micro-batch per step: a step holds 2 rows.
    plan = plan_epoch([3, 7, 9], world_size=2, micro_batches_per_rank=4, grad_accum=1, rows_per_micro_batch=1)
    assert steps_with_rows(plan, 1) == [True, True, False, False]
    assert [[s.index for s in mb] for mb in plan[0][:2]] == [[3], [9]]
    assert [[s.index for s in mb] for mb in plan[1][:2]] == [[7], [3]]  # [3] there is a filler
    assert [s.weight for s in plan[1][1]] == [0.0] and plan[0][1][0].weight == pytest.approx(2.0)  # 2/1 row
    assert plan[0][0][0].weight == pytest.approx(1.0)  # world 2 / 2 rows
    # The same selection in one step of 4 rows per rank: one step, whatever the split.
    plan = plan_epoch([3, 7, 9], world_size=2, micro_batches_per_rank=1, grad_accum=1, rows_per_micro_batch=4)
    assert steps_with_rows(plan, 1) == [True]
    assert sorted(s.index for rank in plan for s in rank[0]) == [3, 7, 9]
    # Every row exactly once; 8 rows fill the first step (2 ranks x 2 micro-batches x 2 rows).
    plan = plan_epoch(list(range(8)), world_size=2, micro_batches_per_rank=4, grad_accum=2, rows_per_micro_batch=2)
    assert steps_with_rows(plan, 2) == [True, False]
    assert sorted(s.index for rank in plan for mb in rank for s in mb if s.weight > 0) == list(range(8))
    with pytest.raises(ValueError):
        plan_epoch(list(range(9)), world_size=2, micro_batches_per_rank=4, grad_accum=2, rows_per_micro_batch=1)
