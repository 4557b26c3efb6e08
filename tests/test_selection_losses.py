"""The pure pieces of unlearning: selection, epoch plans, stop rules, calibration, losses."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_unlearn.core.summary import Thresholds, calibrate_thresholds
from ds_unlearn.unlearn.losses import (
    TERM_CODE,
    negated_task_vector,
    npo_loss,
    per_sequence_capped_nll,
    per_sequence_kl,
    per_sequence_nll,
    per_sequence_profile_gap,
    predicted_tokens,
    row_losses,
    token_surprise,
    weighted_objective,
)
from ds_unlearn.unlearn.selection import (
    ASCEND,
    LEAVE,
    PULL_BACK,
    Slot,
    band_directions,
    epoch_rank,
    match_plan,
    plan_epoch,
    profile_targets,
    rank_matched_sources,
    rank_matched_targets,
    sga_selection,
    step_scale,
    stop_satisfied,
)

BAND = Thresholds(memorized_ma=0.5, over_unlearned_ma=0.2, mean_ma=0.35)


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


def ma_rows(values):
    return [{"ma": v} for v in values]


def test_stop_rules():
    t = Thresholds(memorized_ma=0.6, over_unlearned_ma=0.15, mean_ma=0.3)
    assert stop_satisfied(ma_rows([0.1, 0.59]), "per_sequence", t)
    assert not stop_satisfied(ma_rows([0.0, 0.0, 0.6]), "per_sequence", t)
    # The mean rule is fooled by one sequence that stays fully memorized (the paper's point).
    assert stop_satisfied(ma_rows([0.0, 0.0, 0.0, 0.9]), "mean", t)


def test_calibration_from_holdout_positions():
    # Mid-rank positions of 0.1..0.5 among themselves: 0.1 .. 0.9; at q = 0.25 the ends are out.
    t = calibrate_thresholds(ma_rows([0.1, 0.2, 0.3, 0.4, 0.5]), quantile=0.25)
    assert t.mean_ma == pytest.approx(0.3)
    assert t.sides(ma_rows([0.1, 0.15, 0.2, 0.4, 0.45, 0.5])).tolist() == [-1, -1, 0, 0, 1, 1]
    assert t.ma_levels() == pytest.approx((0.4 + 1e-9, 0.2 - 1e-9))


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
    assert weighted_objective(nll, w).item() == pytest.approx(2.0)
    ascend = torch.full((2,), TERM_CODE["ascend"])
    assert weighted_objective(row_losses(ascend, nll), w).item() == pytest.approx(-2.0)
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


# ---- the band: two-sided per-sequence control -------------------------------------------------


def test_band_places_each_sequence_ascend_leave_or_pull_back():
    # At the thresholds themselves: memorized at >= 0.5, over-unlearned at <= 0.2.
    assert band_directions(ma_rows([0.9, 0.5, 0.49, 0.3, 0.21, 0.2, 0.0]), BAND) == [
        ASCEND,
        ASCEND,
        LEAVE,
        LEAVE,
        LEAVE,
        PULL_BACK,
        PULL_BACK,
    ]


def test_band_rule_stops_only_when_nothing_is_memorized_and_few_are_over_unlearned():
    assert stop_satisfied(ma_rows([0.3, 0.4, 0.25]), "band", BAND)  # stop: all inside the band
    assert not stop_satisfied(ma_rows([0.3, 0.55, 0.25]), "band", BAND)  # continue: one still memorized
    assert not stop_satisfied(ma_rows([0.3, 0.4, 0.1]), "band", BAND)  # continue: pull the 0.1 back
    assert stop_satisfied(ma_rows([0.3, 0.4, 0.1]), "band", BAND, max_over_unlearned=1)  # tolerated
    assert not stop_satisfied(ma_rows([0.0, 0.1, 0.3]), "band", BAND, max_over_unlearned=1)
    # The per_sequence rule is blind to the lower side: it would stop on a set pushed to zero.
    assert stop_satisfied(ma_rows([0.0, 0.0, 0.0]), "per_sequence", BAND)
    assert not stop_satisfied(ma_rows([0.0, 0.0, 0.0]), "band", BAND)


def test_band_epoch_plan_ascends_memorized_and_descends_pulled_back_rows():
    ma = [0.9, 0.3, 0.05, 0.6]
    directions = band_directions(ma_rows(ma), BAND)
    rows = [i for i, d in enumerate(directions) if d != LEAVE]
    terms = ["ascend" if directions[i] == ASCEND else "descend" for i in rows]
    plan = plan_epoch(rows, world_size=1, micro_batches_per_rank=1, grad_accum=1, rows_per_micro_batch=3, terms=terms)
    assert {s.index: s.term for s in plan[0][0]} == {0: "ascend", 2: "descend", 3: "ascend"}
    assert all(s.weight == pytest.approx(1 / 3) for s in plan[0][0])  # the mean over the step's rows
    # The objective of that micro-batch: -nll on rows 0 and 3, +nll on row 2 (pulled back).
    nll = torch.tensor([1.0, 2.0, 4.0])
    codes = torch.tensor([TERM_CODE[s.term] for s in plan[0][0]])
    weights = torch.tensor([s.weight for s in plan[0][0]])
    expected = sum((-1 if s.term == "ascend" else 1) * n for s, n in zip(plan[0][0], nll.tolist())) / 3
    assert weighted_objective(row_losses(codes, nll), weights).item() == pytest.approx(expected)


def test_plan_scales_retain_rows():
    plan = plan_epoch([0, 1, 5], 1, 1, 1, 3, terms=["ascend", "ascend", "descend"], scales=[1.0, 1.0, 0.5])
    assert {s.index: s.term for s in plan[0][0]} == {0: "ascend", 1: "ascend", 5: "descend"}
    assert {s.index: s.weight for s in plan[0][0]} == pytest.approx({0: 1 / 3, 1: 1 / 3, 5: 0.5 / 3})


def test_best_epoch_order_and_step_scale():
    stopped = epoch_rank(0, 1, True, 3.0)
    assert stopped < epoch_rank(1, 0, False, 2.0)  # an epoch that meets the rule beats one that does not
    assert epoch_rank(0, 1, False, 9.0) < epoch_rank(2, 0, False, 1.0)  # then fewer outliers
    assert epoch_rank(0, 1, True, 2.0) < stopped  # then lower holdout loss
    assert epoch_rank(0, 1, True, float("nan")) > stopped  # NaN never wins
    assert step_scale(16, 16, 0.1) == 1.0 and step_scale(4, 16, 0.1) == 0.25 and step_scale(1, 16, 0.1) == 0.1


# ---- retain-side methods' losses, by hand ---------------------------------------------------------


def test_npo_loss_by_hand():
    beta = 0.5
    # Same likelihood as the reference: (2/beta) ln 2.
    assert npo_loss(torch.tensor([-3.0]), torch.tensor([-3.0]), beta).item() == pytest.approx(4 * math.log(2))
    # pi/pi_ref = e^-2: (2/0.5) ln(1 + e^-1).
    assert npo_loss(torch.tensor([-5.0]), torch.tensor([-3.0]), beta).item() == pytest.approx(
        4 * math.log1p(math.e**-1)
    )
    # A huge ratio does not overflow: (2/beta) * beta * log ratio asymptotically.
    assert npo_loss(torch.tensor([0.0]), torch.tensor([-2000.0]), beta).item() == pytest.approx(4000.0)
    # Its gradient is GA's, scaled by 2 sigmoid(beta log ratio): 1 at the start.
    logp = torch.tensor([-3.0], requires_grad=True)
    npo_loss(logp, torch.tensor([-3.0]), beta).sum().backward()
    assert logp.grad.item() == pytest.approx(1.0)


def test_sequence_log_likelihood_counts_predicted_tokens():
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    assert predicted_tokens(labels).tolist() == [3, 1]


def test_per_sequence_kl_by_hand():
    # Vocabulary of 2, one sequence of 3 tokens (2 predicted positions), the second one padding.
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]]))
    ref = torch.log(torch.tensor([[[0.75, 0.25], [0.1, 0.9]]]))
    labels = torch.tensor([[0, 1, 1]])
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_second = 0.1 * math.log(0.1 / 0.9) + 0.9 * math.log(0.9 / 0.1)
    assert per_sequence_kl(logits, ref, labels).item() == pytest.approx((kl_first + kl_second) / 2, rel=1e-5)
    padded = torch.tensor([[0, 1, -100]])  # only the first position predicts a real token
    assert per_sequence_kl(logits, ref, padded).item() == pytest.approx(kl_first, rel=1e-5)
    assert per_sequence_kl(logits, logits[:, :-1].log_softmax(-1), labels).item() == pytest.approx(0.0, abs=1e-7)


def test_row_losses_pick_each_rows_term():
    terms = torch.tensor([TERM_CODE[t] for t in ("descend", "ascend", "npo", "kl")])
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = row_losses(terms, nll, npo=torch.full((4,), 10.0), kl=torch.full((4,), 20.0))
    assert out.tolist() == [1.0, -2.0, 10.0, 20.0]
    with pytest.raises(ValueError, match="npo"):
        row_losses(terms, nll)


def test_thresholds_explicit_then_calibrated_then_fixed():
    from types import SimpleNamespace

    from ds_unlearn.core.errors import InputError
    from ds_unlearn.unlearn.trainer import resolve_thresholds

    holdout = ma_rows([0.1, 0.2, 0.3, 0.4, 0.5])

    def args(**kw):
        base = dict(
            memorized_threshold=None,
            over_unlearned_threshold=None,
            mean_threshold=None,
            calibrate_thresholds=True,
            calibration_quantile=0.25,
            band_on_scores=("ma",),
        )
        return SimpleNamespace(**{**base, **kw})

    t, source = resolve_thresholds(args(), holdout)
    assert (t.mean_ma, source, t.positional()) == (pytest.approx(0.3), "holdout", ("ma",))
    assert t.sides(ma_rows([0.1, 0.3, 0.5])).tolist() == [-1, 0, 1]
    t, source = resolve_thresholds(args(memorized_threshold=0.6, over_unlearned_threshold=0.15), holdout)
    assert (t.memorized_ma, t.over_unlearned_ma, source) == (0.6, 0.15, "explicit")
    t, source = resolve_thresholds(args(calibrate_thresholds=False), None)
    assert (t.memorized_ma, t.over_unlearned_ma, t.mean_ma, source) == (0.6, 0.15, None, "fixed")
    # A holdout scoring all alike still has a band: its value sits at position 0.5.
    t, source = resolve_thresholds(args(), ma_rows([0.0] * 4))
    assert t.sides(ma_rows([0.0, 0.05])).tolist() == [0, 1] and source == "holdout"
    # One side explicit, the other by position.
    t, source = resolve_thresholds(args(memorized_threshold=0.45), holdout)
    assert t.sides(ma_rows([0.1, 0.45])).tolist() == [-1, 1]
    with pytest.raises(InputError, match="memorized_threshold"):
        resolve_thresholds(args(memorized_threshold=0.15, over_unlearned_threshold=0.2), holdout)
    with pytest.raises(InputError, match="needs at least 4"):
        resolve_thresholds(args(), holdout[:3])


def test_collapse_is_reaching_a_uniform_guess_on_the_holdout_from_below():
    from ds_unlearn.unlearn.selection import collapsed

    uniform = math.log(64)
    assert collapsed(3.0, uniform, 64)  # all logits equal: exactly ln(vocab)
    assert collapsed(3.0, 50.0, 64)  # huge wrong logits
    assert not collapsed(3.0, 0.95 * uniform, 64)  # much worse, still better than knowing nothing
    assert not collapsed(8.0, 9.0, 64)  # never better than uniform on this holdout: not judged
    assert not collapsed(None, 9.0, 64) and not collapsed(3.0, None, 64)


def test_undial_targets_lower_only_the_true_token_by_hand():
    from ds_unlearn.unlearn.losses import undial_targets

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    tokens = torch.tensor([0, 2])
    out = undial_targets(torch.log_softmax(logits, -1), tokens, gamma=2.0)
    # By hand: softmax of the logits with the true token's lowered by 2.
    expected = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64), -1)
    assert torch.allclose(out, expected)
    # Every other token keeps its relative probability.
    p = out.exp()
    assert p[0, 1] / p[0, 2] == pytest.approx(math.e) and p[1, 0] / p[1, 1] == pytest.approx(1.0)


losses_list = st.lists(st.floats(0.0, 20.0, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(forget=losses_list, nonmember=losses_list)
def test_rank_matched_targets_follow_the_forget_order_and_the_nonmember_quantiles(forget, nonmember):
    targets = rank_matched_targets(forget, nonmember)
    order = np.argsort(forget, kind="stable")
    # The r-th lowest forget loss gets the non-members' (r + 0.5)/n quantile: the same order, inside their range.
    assert np.all(np.diff(targets[order]) >= -1e-12)
    assert min(nonmember) - 1e-12 <= targets.min() and targets.max() <= max(nonmember) + 1e-12
    expected = np.quantile(nonmember, (np.arange(len(forget)) + 0.5) / len(forget))
    assert np.allclose(targets[order], expected)


def test_rank_matched_targets_by_hand():
    # Two forget rows against non-members 1..5: the lower row gets the 25% quantile (2.0), the other the 75% (4.0).
    assert rank_matched_targets([0.3, 0.1], [5.0, 1.0, 3.0, 2.0, 4.0]).tolist() == [4.0, 2.0]
    assert rank_matched_targets([7.0], [1.0, 2.0, 6.0]).tolist() == [2.0]  # one row: the median
    with pytest.raises(ValueError):
        rank_matched_targets([], [1.0])


def test_match_plan_is_the_gradient_of_the_squared_gap_to_the_targets():
    nll = torch.tensor([0.5, 4.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    targets = [2.5, 3.0, 2.0, 3.5]
    ascend, descend, scales = match_plan(nll.tolist(), targets)
    assert (ascend, descend) == ([0, 3], [1]) and scales == pytest.approx([2.0, 1.0, 0.0, 0.5])
    # As the trainer writes it: the row terms, each weighted by its distance (plan_epoch's scales).
    terms = torch.tensor([TERM_CODE["ascend" if i in ascend else "descend"] for i in range(4)])
    weighted_objective(row_losses(terms, nll), torch.tensor(scales, dtype=torch.float64)).backward()
    squared = nll.detach().clone().requires_grad_(True)
    (0.5 * (squared - torch.tensor(targets, dtype=torch.float64)) ** 2).sum().backward()
    assert torch.allclose(nll.grad, squared.grad)


def test_match_stop_rule_needs_the_band_and_an_auc_near_one_half():
    rows = ma_rows([0.3, 0.4, 0.25])
    assert stop_satisfied(rows, "match", BAND, match_auc=0.53, match_margin=0.05)
    assert not stop_satisfied(rows, "match", BAND, match_auc=0.58, match_margin=0.05)  # still member-like
    assert not stop_satisfied(rows, "match", BAND, match_auc=0.40, match_margin=0.05)  # pushed past unseen text
    assert not stop_satisfied(ma_rows([0.3, 0.55]), "match", BAND, match_auc=0.5)  # one still memorized
    with pytest.raises(ValueError, match="match_auc"):
        stop_satisfied(rows, "match", BAND)
    # The distance to AUC 0.5 ranks epochs after the outlier count and before the holdout loss.
    assert epoch_rank(0, 0, False, 3.0, 0.02) < epoch_rank(0, 0, False, 2.0, 0.2) < epoch_rank(0, 1, False, 2.0, 0.0)


def test_capped_nll_counts_only_tokens_below_the_cap_and_moves_only_them():
    # One row of 4 tokens over a vocabulary of 3 (position j predicts labels[j + 1]).
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[9, 0, 0, 2]])
    token_nll = -torch.log_softmax(logits[0, :3].detach(), -1)[torch.arange(3), labels[0, 1:]]
    cap = float(token_nll[1]) - 1e-3  # positions 0 and 2 are below it, position 1 (a missed token) is not
    assert token_nll[0] < cap and token_nll[2] < cap
    capped = per_sequence_capped_nll(logits, labels, cap)
    assert capped.item() == pytest.approx((token_nll[0] + token_nll[2]).item() / 3)
    nll, _ = per_sequence_nll(logits, labels)
    assert per_sequence_capped_nll(logits, labels, math.inf).item() == pytest.approx(nll.item())
    # Ascending it (the ascend_capped term) leaves the position at the cap untouched.
    row_losses(torch.tensor([TERM_CODE["ascend_capped"]]), nll, capped=capped).sum().backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[0, 3] == 0)
    assert logits.grad[0, 0, 0] > 0  # a step against the gradient lowers the true token's logit
    with pytest.raises(ValueError, match="ascend_capped"):
        row_losses(torch.tensor([TERM_CODE["ascend_capped"]]), nll)


@settings(max_examples=200, deadline=None)
@given(forget=losses_list, nonmember=losses_list)
def test_rank_matched_sources_give_higher_forget_losses_higher_nonmembers(forget, nonmember):
    sources = rank_matched_sources(forget, nonmember)
    assert sources.dtype == np.int64 and np.all((0 <= sources) & (sources < len(nonmember)))
    # In forget-loss order, the sources' losses never fall: the same order as rank_matched_targets.
    order = np.argsort(forget, kind="stable")
    assert np.all(np.diff(np.asarray(nonmember)[sources[order]]) >= 0)


def test_rank_matched_sources_and_profile_targets_by_hand():
    # Non-members by loss: 1.0 (index 1), 2.0 (3), 3.0 (2), 4.0 (4), 5.0 (0). Forget row 1 is the lower:
    # position 0.25 of 5 -> the 2nd lowest (index 3); row 0 at 0.75 -> the 4th (index 4).
    assert rank_matched_sources([0.3, 0.1], [5.0, 1.0, 3.0, 2.0, 4.0]).tolist() == [4, 3]
    assert rank_matched_sources([7.0], [1.0, 2.0, 6.0]).tolist() == [1]  # one row: the median non-member
    # A profile resampled to n positions: its (j + 0.5)/n quantiles, ascending.
    assert profile_targets([3.0, 1.0, 2.0], 3).tolist() == pytest.approx([1 + 1 / 3, 2.0, 3 - 1 / 3])
    assert profile_targets([0.0, 4.0], 1).tolist() == [2.0]
    assert profile_targets([5.0] * 4, 7).tolist() == [5.0] * 7
    with pytest.raises(ValueError):
        rank_matched_sources([], [1.0])
    with pytest.raises(ValueError):
        profile_targets([], 3)


def test_profile_gap_matches_sorted_token_nlls_to_the_profile_and_moves_each_token_toward_its_place():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 4, 2, 7, 3, 9], [5, 6, 8, -100, -100, -100]])  # row 1: 2 predicted positions
    token_nll = -torch.log_softmax(logits[:, :-1].detach(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    profile = torch.zeros(2, 5, dtype=torch.float64)
    profile[0] = torch.tensor([0.5, 1.0, 2.0, 3.0, 8.0])
    profile[1, :2] = torch.tensor([1.0, 9.0])
    gap = per_sequence_profile_gap(logits, labels, profile)
    rows = [np.sort(token_nll[0].numpy()), np.sort(token_nll[1, :2].numpy())]
    expected = [
        0.5 * np.mean((rows[0] - profile[0].numpy()) ** 2),
        0.5 * np.mean((rows[1] - profile[1, :2].numpy()) ** 2),
    ]
    assert gap.tolist() == pytest.approx(expected)
    # Its gradient on each token's NLL is (nll - its profile place) / n: descending the gap raises
    # the row's highest token toward 8 / 9 nats and never touches the padding.
    nll = token_nll.clone().requires_grad_(True)
    per_row = [
        0.5 * ((torch.sort(nll[0]).values - profile[0]) ** 2).mean(),
        0.5 * ((torch.sort(nll[1, :2]).values - profile[1, :2]) ** 2).mean(),
    ]
    sum(per_row).backward()
    assert torch.all(nll.grad[1, 2:] == 0)
    gap.sum().backward()
    assert torch.all(logits.grad[1, 2:-1] == 0) and torch.all(logits.grad[1, -1] == 0)
    top = int(token_nll[0].argmax())
    assert nll.grad[0, top] < 0  # below 8 nats: the step raises it
    # At its own sorted NLLs the gap is 0: a row already on its profile is left where it is.
    own = torch.zeros(2, 5, dtype=torch.float64)
    own[0], own[1, :2] = torch.tensor(rows[0]), torch.tensor(rows[1])
    assert per_sequence_profile_gap(logits, labels, own).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    terms = torch.tensor([TERM_CODE["match_profile"]] * 2)
    assert row_losses(terms, gap, profile=gap).tolist() == gap.tolist()
    with pytest.raises(ValueError, match="match_profile"):
        row_losses(terms, gap)


def test_token_surprise_z_is_minus_min_k_plus_plus_token_score_and_its_lowest_fraction_the_attack():
    from ds_unlearn.core.mia import min_k_plus_plus_score

    torch.manual_seed(1)
    logits = torch.randn(1, 9, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (1, 9))
    valid, z = token_surprise(logits, labels, "z")
    p = torch.softmax(logits[0, :-1], -1).numpy()
    logp = np.log(p)
    true = logp[np.arange(8), labels[0, 1:].numpy()]
    mu = (p * logp).sum(-1)
    sigma = np.sqrt((p * logp**2).sum(-1) - mu**2)
    assert valid.all() and z[0].numpy() == pytest.approx(-(true - mu) / sigma)
    # Min-K%++ (k = 0.25: the 2 lowest of 8 token scores) is the mean of the 2 highest surprises.
    assert min_k_plus_plus_score(true, mu, sigma, 0.25) == pytest.approx(np.sort(z[0].numpy())[-2:].mean())
    _, nll = token_surprise(logits, labels, "nll")
    assert nll[0].numpy() == pytest.approx(-true)
    with pytest.raises(ValueError, match="unknown token statistic"):
        token_surprise(logits, labels, "entropy")


def _score_after_lowering(logprobs, tokens, gamma):
    """Min-K%++'s token score of the true tokens, from the lowered distribution itself."""
    from ds_unlearn.core.passes import logprob_moments
    from ds_unlearn.unlearn.losses import undial_targets

    lowered = undial_targets(logprobs, tokens, gamma)
    mu, sigma = logprob_moments(lowered)
    return (lowered[torch.arange(len(tokens)), tokens] - mu) / sigma


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 12.0), peak=st.floats(0.0, 25.0))
def test_lowered_logit_z_equals_the_score_of_the_lowered_distribution(seed, scale, peak):
    from ds_unlearn.unlearn.losses import lowered_logit_z

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=generator, dtype=torch.float64) * scale
    tokens = torch.randint(0, 40, (6,), generator=generator)
    logits[torch.arange(6), tokens] += peak  # up to near one-hot on the true token (a memorized one)
    logprobs = torch.log_softmax(logits, -1)
    gamma = torch.rand(6, generator=generator, dtype=torch.float64) * 40
    expected = _score_after_lowering(logprobs, tokens, gamma)
    assert torch.allclose(lowered_logit_z(logprobs, tokens, gamma), expected, rtol=1e-6, atol=1e-6)


def test_z_matched_gamma_lowers_each_true_token_to_its_target_score_and_never_raises_one():
    from ds_unlearn.unlearn.losses import lowered_logit_z, z_matched_gamma

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=generator, dtype=torch.float64) * 2
    tokens = torch.tensor([0, 1, 2, 3])
    logits[0, 0] += 20.0  # memorized: far above the target
    logits[1, 1] -= 8.0  # already unlikely: below the target
    logits[3, 3] += 20.0  # memorized, with a target no lowering within reach can meet
    logprobs = torch.log_softmax(logits, -1)
    start = lowered_logit_z(logprobs, tokens, torch.zeros(4, dtype=torch.float64))
    assert start[1] < -1.0 < start[0]
    target = torch.tensor([-1.0, -1.0, float(start[2]) - 0.5, -1e6], dtype=torch.float64)
    gamma = z_matched_gamma(logprobs, tokens, target, max_gamma=60.0)
    reached = lowered_logit_z(logprobs, tokens, gamma)
    assert reached[0] == pytest.approx(-1.0, abs=1e-6) and reached[2] == pytest.approx(float(target[2]), abs=1e-6)
    assert gamma[0] > 10.0 and 0 < gamma[2] < gamma[0]
    assert gamma[1] == 0.0  # already at or below its target: left as the input model has it
    assert gamma[3] == pytest.approx(60.0)  # out of reach: lowered as far as allowed


def test_entropy_shortfall_counts_only_confidently_wrong_positions_by_hand():
    from ds_unlearn.unlearn.losses import IGNORE, per_sequence_entropy_shortfall

    # One row, three predicted positions over a vocabulary of 3: right and peaked, wrong and peaked,
    # wrong and spread; a padded fourth position.
    logits = torch.tensor(
        [[[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 0.1], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64
    )
    labels = torch.tensor([[1, 0, 0, 0, IGNORE]])  # position j predicts labels[j + 1]

    def entropy(row):
        p = torch.softmax(row, -1)
        return float(-(p * p.log()).sum())

    floor = 0.5
    # Position 0 predicts 0 with argmax 0 (right: free); 1 predicts 0 with argmax 1 (wrong, peaked);
    # 2 predicts 0 with argmax 2 (wrong, spread above the floor); 3 is padding.
    expected = max(0.0, floor - entropy(logits[0, 1])) / 3
    assert entropy(logits[0, 2]) > floor
    got = per_sequence_entropy_shortfall(logits, labels, floor)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(expected)
    assert float(per_sequence_entropy_shortfall(logits, labels, 0.0)[0]) == 0.0
    # Its gradient raises the wrong peaked position's entropy: it lowers that position's top logit.
    leaf = logits.clone().requires_grad_(True)
    per_sequence_entropy_shortfall(leaf, labels, floor).sum().backward()
    assert leaf.grad[0, 1, 1] > 0 and torch.all(leaf.grad[0, 0] == 0) and torch.all(leaf.grad[0, 2] == 0)


def test_z_shortfall_lifts_only_tokens_scored_below_the_floor_by_hand():
    from ds_unlearn.unlearn.losses import IGNORE, per_sequence_z_shortfall

    # One row over a vocabulary of 4: the true token likely (high score), the true token unlikely under
    # a peaked wrong guess (score far below), the true token unlikely under a spread guess; padding.
    logits = torch.tensor(
        [[[6.0, 0.0, 0.0, 0.0], [0.0, 8.0, 1.0, 0.0], [0.0, 0.5, 0.4, 0.3], [0.0] * 4, [0.0] * 4]],
        dtype=torch.float64,
    )
    labels = torch.tensor([[1, 0, 0, 0, IGNORE]])  # position j predicts labels[j + 1]

    def z(row, token):  # Min-K%++'s token score, from its definition
        logp = torch.log_softmax(row, -1)
        p = logp.exp()
        mu = float((p * logp).sum())
        sigma = float(((p * (logp - mu) ** 2).sum()).sqrt())
        return (float(logp[token]) - mu) / sigma

    scores = [z(logits[0, j], 0) for j in range(3)]
    floor = -1.0
    assert scores[0] > floor and scores[1] < -10 and floor > scores[2] > -2.5
    expected = sum(np.log1p(max(0.0, floor - s)) for s in scores) / 3
    got = per_sequence_z_shortfall(logits, labels, floor)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(expected, rel=1e-9)
    assert float(per_sequence_z_shortfall(logits, labels, -100.0)[0]) == 0.0  # nothing below that floor
    # Descending it raises the low scores: one small step on the peaked wrong position lifts its score,
    # and leaves the position scored above the floor alone.
    leaf = logits.clone().requires_grad_(True)
    per_sequence_z_shortfall(leaf, labels, floor).sum().backward()
    assert torch.all(leaf.grad[0, 0] == 0) and torch.all(leaf.grad[0, 3:] == 0)
    stepped = (logits - 0.1 * leaf.grad.detach())[0]
    assert z(stepped[1], 0) > scores[1] and z(stepped[2], 0) > scores[2]
    # The logarithm: the peaked position's pull per unit of score is 1 / (1 + floor - z), so a token
    # a hundred times further below than another does not pull a hundred times harder.
    assert float(leaf.grad[0, 1].norm()) < 100 * float(leaf.grad[0, 2].norm())


@pytest.mark.parametrize("term", ["kl", "capped", "z_shortfall"])
def test_on_rows_gives_the_full_batch_values_and_gradients_at_its_rows(term):
    from ds_unlearn.unlearn.losses import IGNORE, on_rows, per_sequence_z_shortfall

    torch.manual_seed(0)
    B, T, V = 5, 6, 11
    labels = torch.randint(0, V, (B, T))
    labels[1, 4:] = IGNORE  # a padded row among the chosen ones
    reference = torch.log_softmax(torch.randn(B, T - 1, V), -1)
    index = torch.tensor([1, 3, 4])
    fns = {
        "kl": lambda x, y: per_sequence_kl(x, reference.index_select(0, index), y),
        "capped": lambda x, y: per_sequence_capped_nll(x, y, cap=4.0),
        "z_shortfall": lambda x, y: per_sequence_z_shortfall(x, y, floor=3.0),
    }
    full_fns = {
        "kl": lambda x, y: per_sequence_kl(x, reference, y),
        "capped": lambda x, y: per_sequence_capped_nll(x, y, cap=4.0),
        "z_shortfall": lambda x, y: per_sequence_z_shortfall(x, y, floor=3.0),
    }
    logits = (3 * torch.randn(B, T, V)).requires_grad_()
    part = on_rows(fns[term], index, B, logits, labels)
    (part * torch.arange(1.0, B + 1)).sum().backward()
    part_grad, logits.grad = logits.grad.clone(), None
    full = full_fns[term](logits, labels)
    chosen = torch.zeros(B, dtype=torch.bool).index_fill(0, index, True)
    (torch.where(chosen, full, torch.zeros_like(full)) * torch.arange(1.0, B + 1)).sum().backward()
    # The chosen rows' values and gradients equal the whole batch's; the others are 0 and untouched.
    assert torch.allclose(part[index], full[index].detach(), atol=1e-6) and bool(torch.all(part[~chosen] == 0))
    assert float(part[index].abs().min()) > 0  # the term is live at every chosen row
    assert torch.allclose(part_grad, logits.grad, atol=1e-6)
    assert bool(torch.all(part_grad[~chosen] == 0)) and float(part_grad[index].abs().sum()) > 0
