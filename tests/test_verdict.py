"""The one verdict (core/verdict.py): mid-rank positions among the holdout flag text drawn like
the holdout at under twice the nominal rate per side on any distribution, and never collapse."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from ds_unlearn.cli import main
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.scorer import score_sequences
from ds_unlearn.core.summary import calibrate_thresholds
from ds_unlearn.core.toy import memorize, random_sequences, tiny_model
from ds_unlearn.core.verdict import (
    IN_BAND,
    MEMORIZED,
    OVER_UNLEARNED,
    Thresholds,
    midrank_position,
    min_holdout_rows,
)

QUANTILES = st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.25])
# Holdout MA-like values: continuous, discrete on a k/(T-1) grid, heavily tied at 0, all tied.
CONTINUOUS = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300)
GRID = st.integers(1, 40).flatmap(lambda t: st.lists(st.integers(0, t).map(lambda k: k / t), min_size=1, max_size=300))
MOSTLY_ZERO = st.lists(st.sampled_from([0.0] * 12 + [1 / 23, 2 / 23, 5 / 23]), min_size=1, max_size=300)
ALL_TIED = st.tuples(st.floats(0, 1), st.integers(1, 300)).map(lambda vn: [vn[0]] * vn[1])
HOLDOUTS = st.one_of(CONTINUOUS, GRID, MOSTLY_ZERO, ALL_TIED)


def rows(values, key="ma"):
    return [{key: float(v)} for v in values]


def shares(t: Thresholds, values, key="ma"):
    sides = t.sides(rows(values, key))
    return float(np.mean(sides == MEMORIZED)), float(np.mean(sides == OVER_UNLEARNED))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(HOLDOUTS, QUANTILES)
def test_text_drawn_like_the_holdout_is_flagged_under_twice_the_rate_per_side(holdout, q):
    # Text drawn from the holdout's own distribution (its empirical one): each side flags a share
    # strictly below 2q, whatever the ties (an atom of mass p flags only under q - p/2 beyond it).
    t = Thresholds(None, None, quantile=q).calibrated(rows(holdout)) if len(holdout) >= min_holdout_rows(q) else None
    if t is None:
        return
    memorized, over = shares(t, holdout)
    assert memorized < 2 * q and over < 2 * q


@settings(max_examples=300, deadline=None, derandomize=True)
@given(HOLDOUTS, QUANTILES)
def test_the_band_never_has_zero_width(holdout, q):
    # Some holdout value is always in band (the one holding its median), even when all tie.
    if len(holdout) < min_holdout_rows(q):
        return
    t = Thresholds(None, None, quantile=q).calibrated(rows(holdout))
    assert np.any(t.sides(rows(holdout)) == IN_BAND)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from(["normal", "grid", "mostly_zero"]), st.integers(0, 2**31 - 1))
def test_fresh_draws_of_the_holdouts_distribution_are_flagged_near_the_nominal_rate(family, seed):
    rng = np.random.default_rng(seed)
    draw = {
        "normal": lambda n: rng.normal(size=n),
        "grid": lambda n: rng.integers(0, 6, size=n) / 23,
        "mostly_zero": lambda n: rng.choice([0.0, 1 / 23, 2 / 23], p=[0.8, 0.15, 0.05], size=n),
    }[family]
    t = Thresholds(None, None, band_on=("loss",)).calibrated(rows(draw(400), "loss"))
    memorized, over = shares(t, draw(4000), "loss")
    # Below 2q = 0.10 per side in the population; 0.03 covers the holdout's own sampling noise.
    assert memorized < 0.13 and over < 0.13


def test_midrank_position_splits_ties_and_matches_a_hand_count():
    reference = [0, 0, 0, 1, 2]
    assert midrank_position([0, 1, 2, 3, -1, 0.5], reference).tolist() == pytest.approx(
        [1.5 / 5, 3.5 / 5, 4.5 / 5, 1.0, 0.0, 3 / 5]
    )


def test_the_old_percentile_cut_collapsed_where_the_new_rule_holds():
    # 75% of a random-token holdout at MA 0: q05 = q95... cut with >= / <= flags most of it.
    holdout = [0.0] * 12 + [1 / 23] * 3 + [2 / 23]
    assert np.quantile(holdout, 0.05) == 0.0 and np.mean(np.asarray(holdout) <= np.quantile(holdout, 0.05)) == 0.75
    t = calibrate_thresholds(rows(holdout), quantile=1 / 16)
    memorized, over = shares(t, holdout)
    assert over == 0.0 and memorized == 1 / 16  # only the single highest value
    assert t.sides(rows([0.0, 1 / 23, 2 / 23, 3 / 23])).tolist() == [IN_BAND, IN_BAND, MEMORIZED, MEMORIZED]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(GRID, QUANTILES, st.integers(1, 40))
def test_equivalent_ma_levels_give_the_same_verdicts(holdout, q, t_len):
    if len(holdout) < min_holdout_rows(q):
        return
    t = Thresholds(None, None, quantile=q).calibrated(rows(holdout))
    grid = [k / t_len for k in range(t_len + 1)] + sorted(set(holdout))
    memorized, over = t.ma_levels()
    levels = Thresholds(memorized, over) if 0 <= over < memorized <= 1 else None
    by_position = t.sides(rows(grid))
    by_levels = np.where(np.asarray(grid) >= memorized, MEMORIZED, np.where(np.asarray(grid) <= over, -1, 0))
    assert by_position.tolist() == by_levels.tolist()
    if levels is not None:
        assert levels.sides(rows(grid)).tolist() == by_position.tolist()


def test_band_on_several_scores_is_member_side_first():
    holdout = [{"ma": 0.0, "loss": 3.0 + i / 100} for i in range(40)]
    t = Thresholds(None, None, band_on=("ma", "loss")).calibrated(holdout)
    judged = [
        {"ma": 0.0, "loss": 3.1},  # inside on both
        {"ma": 0.5, "loss": 3.1},  # MA high: memorized
        {"ma": 0.0, "loss": 1.0},  # loss below every unseen one: member-like, memorized
        {"ma": 0.0, "loss": 9.0},  # loss above every unseen one: pushed past, over-unlearned
        {"ma": 0.5, "loss": 9.0},  # member side on one score wins
    ]
    assert t.sides(judged).tolist() == [IN_BAND, MEMORIZED, MEMORIZED, OVER_UNLEARNED, MEMORIZED]
    assert t.counts(judged) == {"memorized": 3, "over_unlearned": 1}


def test_explicit_levels_win_and_bad_settings_are_refused():
    holdout = rows([0.0] * 30)
    t = Thresholds(0.6, None).calibrated(holdout)  # memorized by level, over-unlearned by position
    assert t.sides(rows([0.59, 0.6])).tolist() == [IN_BAND, MEMORIZED]
    with pytest.raises(InputError, match="needs at least 20"):
        Thresholds(None, None).calibrated(holdout[:19])
    with pytest.raises(InputError, match="calibration_quantile"):
        Thresholds(None, None, quantile=0.3)
    with pytest.raises(InputError, match="band_on"):
        Thresholds(None, None, band_on="ma,perplexity")
    with pytest.raises(InputError, match="read only when band_on includes ma"):
        Thresholds(0.6, 0.15, band_on=("loss",))


def test_unseen_text_of_a_real_random_token_model_is_mostly_in_band():
    # A tiny model that memorized 8 random strings: unseen strings score MA mostly 0 (ties), and
    # fresh unseen ones are flagged at most about twice the nominal 5% per side; the memorized ones
    # are all memorized.
    vocab = 64
    torch.manual_seed(0)
    model = memorize(tiny_model("llama", seed=3, vocab_size=vocab), random_sequences(8, 24, vocab, seed=40), steps=120)
    model.eval()
    holdout = score_sequences(model, random_sequences(60, 24, vocab, seed=41), el_n=(), extract_k=(8,), membership=True)
    fresh = score_sequences(model, random_sequences(200, 24, vocab, seed=42), el_n=(), extract_k=(8,), membership=True)
    trained = score_sequences(model, random_sequences(8, 24, vocab, seed=40), el_n=(), extract_k=(8,), membership=True)
    assert np.mean([r["ma"] == 0.0 for r in holdout]) > 0.5  # mostly tied at 0
    for band_on in (("ma",), ("ma", "loss", "min_k++")):
        t = calibrate_thresholds(holdout, band_on=band_on)
        sides = t.sides(fresh)
        assert np.mean(sides == MEMORIZED) <= 0.12 and np.mean(sides == OVER_UNLEARNED) <= 0.12, band_on
        assert np.all(t.sides(trained) == MEMORIZED)


def test_an_audit_of_one_unseen_set_against_another_reads_unseen(random_case, tmp_path):
    # Two sets the model never saw: every attack's interval covers 0.5, and the calibrated verdicts
    # leave at most 20% of the rows outside "unseen-like".
    out = tmp_path / "audit"
    argv = ["audit", "--model", str(random_case / "model"), "--forget", str(random_case / "unseen.jsonl")]
    argv += ["--holdout", str(random_case / "holdout.jsonl"), "--out", str(out), "--extract_k", "8", "--el_n", "5"]
    argv += ["--prefix_length", "8", "--suffix_length", "16", "--bootstrap", "200"]
    assert main(argv) == 0
    summary = json.loads((out / "audit.json").read_text())
    assert summary["thresholds"]["rule"] == "holdout" and summary["thresholds"]["holdout_rows"] == 24
    for attack, entry in summary["mia"].items():
        low, high = entry["ci95"]
        assert low <= 0.5 <= high and not entry["distinguishable"], attack
    rows = read_jsonl(out / "audit.jsonl")
    outside = [r for r in rows if r["verdict"] != "unseen-like"]
    assert len(outside) <= 0.2 * len(rows), [r["verdict"] for r in outside]


def test_unlearn_judges_band_on_scores_from_its_one_teacher_forced_pass(random_case, tmp_path):
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(random_case / "model"), "--forget", str(random_case / "forget.jsonl")]
    argv += ["--holdout", str(random_case / "unseen.jsonl"), "--output_dir", str(out), "--extract_k", "8"]
    argv += ["--learning_rate", "3e-3", "--per_device_train_batch_size", "12", "--save_strategy", "no"]
    argv += ["--method", "sga", "--band_on", "ma,loss", "--calibration_quantile", "0.1", "--num_train_epochs", "12"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    t = report["thresholds"]
    assert t["band_on"] == ["ma", "loss"] and t["score_quantile"] == pytest.approx(0.05) and t["holdout_rows"] == 24
    # Recount the final verdicts by hand: mid-rank positions of MA and loss among the holdout's,
    # scored by an independent pass of the written model.
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    holdout_rows = read_jsonl(random_case / "unseen.jsonl")
    before = AutoModelForCausalLM.from_pretrained(random_case / "model").eval()
    holdout = score_sequences(before, [r["input_ids"] for r in holdout_rows], el_n=(), extract_k=(8,))
    after = score_sequences(
        model, [r["input_ids"] for r in read_jsonl(random_case / "forget.jsonl")], el_n=(), extract_k=(8,)
    )
    memorized = over = 0
    for row in after:
        sides = []
        for score, member_high in (("ma", True), ("loss", False)):
            ref = np.array([h[score] for h in holdout])
            p = (np.sum(ref < row[score]) + 0.5 * np.sum(ref == row[score])) / len(ref)
            high, low = p > 0.95, p < 0.05
            sides.append(1 if (high if member_high else low) else -1 if (low if member_high else high) else 0)
        memorized += 1 in sides
        over += 1 not in sides and -1 in sides
    assert (report["after"]["memorized"], report["after"]["over_unlearned"]) == (memorized, over)
    assert report["history"][0]["forget/memorized"] == 12


def test_recalibrate_judges_each_model_among_its_own_scores_of_unseen_text(random_case):
    """``audit(recalibrate=True)``: thresholds calibrated under another model (one that scores unseen
    text MA 0.5..0.96) are re-placed among this model's own non-members, so unseen text reads
    unseen-like; without it every row reads over-unlearned against the other model's band."""
    from ds_unlearn.core.audit import audit

    model = AutoModelForCausalLM.from_pretrained(random_case / "model").eval()
    sets = {name: [r["input_ids"] for r in read_jsonl(random_case / f"{name}.jsonl")] for name in ("unseen", "holdout")}
    other = Thresholds(None, None).calibrated([{"ma": 0.5 + i / 50} for i in range(24)])
    options = dict(extract_k=(8,), el_n=(5,), prefix_length=8, suffix_length=16, bootstrap=20, greedy=True)
    given = audit(model, sets["unseen"], sets["holdout"], thresholds=other, **options)
    own = audit(model, sets["unseen"], sets["holdout"], thresholds=other, recalibrate=True, **options)
    name = {MEMORIZED: "memorized", OVER_UNLEARNED: "over-unlearned", IN_BAND: "unseen-like"}
    for result, thresholds, here in (
        (given, other, False),
        (own, other.calibrated(own.set_rows("holdout")), True),
    ):
        forget = result.set_rows("forget")
        assert not any(r["discoverable"] for r in forget)  # so the MA verdict is each row's verdict
        assert [r["verdict"] for r in forget] == [name[int(s)] for s in thresholds.sides(forget)]
        assert result.summary["thresholds"]["calibrated_on_audit"] is here
        assert result.summary["thresholds"]["band"] == thresholds.band()
    assert given.summary["forget"]["verdicts"]["over-unlearned"] == 24
    assert own.summary["forget"]["verdicts"]["over-unlearned"] + own.summary["forget"]["verdicts"]["memorized"] <= 3
    # The same scores: recalibration changes the verdicts only.
    assert [r["ma"] for r in given.rows] == [r["ma"] for r in own.rows]
    with pytest.raises(InputError, match="recalibrate: judging MA by holdout position needs greedy"):
        options["greedy"] = False
        audit(model, sets["unseen"], sets["holdout"], thresholds=other, recalibrate=True, **options)
