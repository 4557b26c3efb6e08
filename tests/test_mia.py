"""Membership scores and the sampling-extraction probability, held equal to a hand computation:
plain loops over ``model(...)`` logits, one prefix at a time, in float64."""

import math
import zlib

import numpy as np
import pytest
import torch

import ds_unlearn
from ds_unlearn.core.audit import AuditSettings, sequence_bytes
from ds_unlearn.core.mia import (
    discoverable,
    extraction_log10_p,
    percentile_in,
    roc_auc,
    roc_auc_interval,
    samples_needed,
    token_bytes,
)
from ds_unlearn.core.toy import memorize, random_sequences, tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def case():
    """A float64 tiny Llama that memorized 3 sequences; 3 unseen ones as the holdout."""
    seqs = random_sequences(6, [20, 24, 18, 22, 20, 19], VOCAB, seed=5)
    model = memorize(tiny_model("llama", seed=3, vocab_size=VOCAB), seqs[:3], steps=80)
    return model.double().eval(), seqs[:3], seqs[3:]


def audit_fixed(*args, **options):
    """``ds_unlearn.audit`` with the ICML code's fixed MA verdict levels: these 3-row holdouts are
    too small to place a sequence among."""
    return ds_unlearn.audit(*args, thresholds=ds_unlearn.Thresholds(), **options)


def hand_token_stats(model, seq, temperature=1.0, top_k=None, top_p=None):
    """Per predicted token t = 1..T-1: log p, mu, sigma, and log q under the decoding rule,
    each from its own forward pass over the prefix x[:t]."""
    out = {"logp": [], "mu": [], "sigma": [], "logq": []}
    for t in range(1, len(seq)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double()
        p = torch.softmax(logits, -1).tolist()
        lp = [math.log(v) for v in p]
        mu = sum(pv * lv for pv, lv in zip(p, lp))
        var = sum(pv * lv * lv for pv, lv in zip(p, lp)) - mu * mu
        out["logp"].append(lp[seq[t]])
        out["mu"].append(mu)
        out["sigma"].append(math.sqrt(var))
        # The decoding distribution: temperature, then top-k, then top-p (nucleus), renormalised.
        scaled = torch.softmax(logits / temperature, -1).tolist()
        kept = set(range(len(scaled)))
        if top_k:
            kth = sorted(scaled, reverse=True)[top_k - 1]
            kept = {v for v in kept if scaled[v] >= kth}
        if top_p is not None:
            mass = sum(scaled[v] for v in kept)
            probs = {v: scaled[v] / mass for v in kept}
            # Nucleus: a token stays when the tokens strictly more probable hold less than top_p.
            kept = {v for v in kept if sum(q for u, q in probs.items() if q > probs[v]) < top_p}
        total = sum(scaled[v] for v in kept)
        out["logq"].append(math.log(scaled[seq[t]] / total) if seq[t] in kept else -math.inf)
    return out


def hand_scores(model, seq, k=0.2, data=None, prefix=4, suffix=None, **decoding):
    s = hand_token_stats(model, seq, **decoding)
    n = len(s["logp"])
    count = max(1, int(n * k))
    loss = -sum(s["logp"]) / n
    z = [(lp - mu) / sg for lp, mu, sg in zip(s["logp"], s["mu"], s["sigma"])]
    suffix_logq = s["logq"][prefix - 1 : (n if suffix is None else prefix - 1 + suffix)]
    log10_p = -math.inf if -math.inf in suffix_logq else sum(suffix_logq) / math.log(10)
    return {
        "loss": loss,
        "zlib": loss / len(zlib.compress(data if data is not None else token_bytes(seq))),
        "min_k": -sum(sorted(s["logp"])[:count]) / count,
        "min_k++": -sum(sorted(z)[:count]) / count,
        "log10_p": log10_p,
    }


@pytest.mark.parametrize(
    "decoding",
    [
        {},
        {"temperature": 0.7},
        {"temperature": 1.3, "top_k": 5},
        {"top_p": 0.8},
        {"temperature": 0.9, "top_k": 12, "top_p": 0.6},
    ],
    ids=["pure", "temperature", "top_k", "top_p", "all_three"],
)
def test_audit_scores_equal_hand_computation(case, decoding):
    model, forget, holdout = case
    result = audit_fixed(
        model, forget, holdout, prefix_length=4, suffix_length=None, extract_k=(4,), el_n=(5,), bootstrap=0, **decoding
    )
    for row, seq in zip(result.rows, forget + holdout):
        hand = hand_scores(model, seq, prefix=4, **decoding)
        for key in ("loss", "zlib", "min_k", "min_k++"):
            assert row[key] == pytest.approx(hand[key], rel=1e-9, abs=1e-12), (row["set"], row["id"], key)
        if hand["log10_p"] == -math.inf:
            assert row["log10_p"] == -math.inf and row["samples_50"] == math.inf and not row["discoverable"]
            assert row["outside_kept"] >= 1
        else:
            assert row["log10_p"] == pytest.approx(hand["log10_p"], rel=1e-9, abs=1e-12), (row["id"], decoding)
            assert row["outside_kept"] == 0


def test_fixed_suffix_and_min_k_fraction(case):
    model, forget, holdout = case
    result = audit_fixed(
        model, forget, holdout, prefix_length=5, suffix_length=7, min_k=0.5, extract_k=(4,), el_n=(5,), bootstrap=0
    )
    for row, seq in zip(result.rows, forget + holdout):
        hand = hand_scores(model, seq, k=0.5, prefix=5, suffix=7)
        assert row["min_k"] == pytest.approx(hand["min_k"], rel=1e-9)
        assert row["min_k++"] == pytest.approx(hand["min_k++"], rel=1e-9)
        assert row["log10_p"] == pytest.approx(hand["log10_p"], rel=1e-9)


def test_truncation_that_excludes_the_true_token_gives_p_zero(case):
    """top-k 1 and a tiny top-p keep only the argmax: a memorized suffix stays sampleable with
    p = 1 (log10 p = 0), an unseen one falls outside the kept set (p = 0, log10 p = -inf)."""
    model, forget, holdout = case
    for decoding in ({"top_k": 1}, {"top_p": 1e-6}):
        result = audit_fixed(
            model,
            forget,
            holdout,
            prefix_length=4,
            suffix_length=None,
            extract_k=(4,),
            el_n=(5,),
            bootstrap=0,
            **decoding,
        )
        for row, seq in zip(result.rows, forget + holdout):
            hand = hand_scores(model, seq, prefix=4, **decoding)
            if row["set"] == "forget":
                assert row["ma"] == 1.0 and row["log10_p"] == 0.0 and row["samples_50"] == 0.0
                assert row["discoverable"] and row["verdict"] == "memorized"
            else:
                assert hand["log10_p"] == -math.inf
                assert row["log10_p"] == -math.inf and row["samples_99"] == math.inf
                assert not row["discoverable"] and row["outside_kept"] >= 1


def test_zlib_compresses_the_decoded_text_when_there_is_a_tokenizer(case):
    class Chars:  # a stand-in tokenizer: id i is the character chr(65 + i % 26)
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(65 + i % 26) for i in ids)

    model, forget, holdout = case
    result = audit_fixed(
        model,
        forget,
        holdout,
        tokenizer=Chars(),
        prefix_length=4,
        suffix_length=None,
        extract_k=(4,),
        el_n=(5,),
        bootstrap=0,
    )
    seq = forget[0]
    text = Chars().decode(seq).encode()
    assert sequence_bytes(seq, Chars()) == text
    hand = hand_scores(model, seq, data=text, prefix=4)
    assert result.rows[0]["zlib"] == pytest.approx(hand["zlib"], rel=1e-9)


def test_samples_needed_and_discoverability_by_hand():
    q, p = 0.5, 0.01
    n = math.log(1 - q) / math.log(1 - p)  # 68.97 samples
    assert samples_needed(math.log10(p), q) == pytest.approx(n, rel=1e-12)
    assert discoverable(math.log10(p), 69, q) and not discoverable(math.log10(p), 68, q)
    assert 1 - (1 - p) ** 69 >= q > 1 - (1 - p) ** 68  # the definition itself
    # Tiny p: log(1-p) ~ -p, so n ~ log(2) / p, even where p itself underflows a float.
    assert samples_needed(-30.0, 0.5) == pytest.approx(math.log(2) * 1e30, rel=1e-9)
    assert samples_needed(-400.0, 0.99) == math.inf
    assert samples_needed(-math.inf, 0.5) == math.inf and not discoverable(-math.inf, 10**9, 0.5)
    assert samples_needed(0.0, 0.99) == 0.0
    assert extraction_log10_p([-1.0, math.log(0.5), math.log(0.1), -2.0], prefix_length=2, suffix_length=2) == (
        pytest.approx(math.log10(0.05))
    )
    with pytest.raises(ValueError):
        extraction_log10_p([-1.0, -1.0], prefix_length=2, suffix_length=2)


def test_percentile_auc_and_bootstrap():
    assert percentile_in(2.0, [1.0, 2.0, 3.0, 4.0]) == 50.0
    assert percentile_in(0.5, [1.0, 2.0]) == 0.0 and percentile_in(9.0, [1.0, 2.0]) == 100.0
    # Members have the lower (loss-like) scores: AUC 1; interleaved: 0.5; reversed: 0.
    assert roc_auc([1, 2], [3, 4]) == 1.0 and roc_auc([3, 4], [1, 2]) == 0.0
    assert roc_auc([1, 4], [2, 3]) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 40), rng.normal(1, 1, 40)
    lo, hi = roc_auc_interval(a, b, resamples=300, seed=7)
    assert lo < roc_auc(a, b) < hi and (lo, hi) == roc_auc_interval(a, b, resamples=300, seed=7)
    assert roc_auc_interval(a, b, resamples=0) is None


def test_bootstrap_interval_is_the_percentiles_of_sklearn_aucs_of_the_same_resamples():
    """The vectorized Mann-Whitney AUCs equal roc_auc (sklearn) on each resample, ties included."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 6, 12).astype(float), rng.integers(2, 8, 9).astype(float)  # many ties
    resamples = 200
    draw = np.random.default_rng(11)
    members = a[draw.integers(0, len(a), (resamples, len(a)))]
    nonmembers = b[draw.integers(0, len(b), (resamples, len(b)))]
    expected = np.percentile([roc_auc(m, n) for m, n in zip(members, nonmembers)], [2.5, 97.5])
    assert roc_auc_interval(a, b, resamples=resamples, seed=11) == pytest.approx(tuple(expected), abs=1e-12)


def test_auc_difference_is_the_percentiles_of_paired_sklearn_aucs_and_pairing_cancels_shared_noise():
    from ds_unlearn.core.mia import auc_difference

    rng = np.random.default_rng(5)
    # The retrained model's scores: members and non-members drawn alike (it saw neither).
    member_r, nonmember_r = rng.normal(0, 1, 32), rng.normal(0, 1, 48)
    # By hand: each resample draws the same records of each set for both models.
    shifted = member_r - 0.8  # a model that still scores every forget record 0.8 lower
    resamples = 200
    draw = np.random.default_rng(9)
    m_idx, n_idx = draw.integers(0, 32, (resamples, 32)), draw.integers(0, 48, (resamples, 48))
    deltas = [roc_auc(shifted[m], nonmember_r[n]) - roc_auc(member_r[m], nonmember_r[n]) for m, n in zip(m_idx, n_idx)]
    got = auc_difference(shifted, nonmember_r, member_r, nonmember_r, resamples=resamples, seed=9)
    assert got["delta"] == pytest.approx(roc_auc(shifted, nonmember_r) - roc_auc(member_r, nonmember_r), abs=1e-12)
    assert got["ci95"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    assert got["ci95"][0] > 0 and got["indistinguishable"] is False  # still member-like: told apart
    # A model whose scores are the retrained model's plus small per-record noise sits at it; the
    # paired interval is far narrower than either AUC's own (the records' luck is shared).
    near = auc_difference(
        member_r + rng.normal(0, 0.05, 32), nonmember_r + rng.normal(0, 0.05, 48), member_r, nonmember_r, seed=1
    )
    own = roc_auc_interval(member_r, nonmember_r, seed=1)
    assert near["indistinguishable"] is True and near["ci95"][0] <= 0.0 <= near["ci95"][1]
    assert near["ci95"][1] - near["ci95"][0] < 0.25 * (own[1] - own[0])
    same = auc_difference(member_r, nonmember_r, member_r, nonmember_r, resamples=50)
    assert same == {"delta": 0.0, "ci95": [0.0, 0.0], "indistinguishable": True}
    assert auc_difference(shifted, nonmember_r, member_r, nonmember_r, resamples=0) == {
        "delta": got["delta"],
        "ci95": None,
        "indistinguishable": None,
    }
    with pytest.raises(ValueError, match="forget 31 vs 32, holdout 48 vs 48"):
        auc_difference(shifted[:31], nonmember_r, member_r, nonmember_r)
    with pytest.raises(ValueError, match="non-empty 1-D"):  # not a verdict of "told apart" on nothing
        auc_difference([], nonmember_r, [], nonmember_r)
    with pytest.raises(ValueError, match="level must lie in"):
        auc_difference(shifted, nonmember_r, member_r, nonmember_r, level=1.5)


def test_summary_auc_matches_sklearn_on_the_rows(case):
    from sklearn.metrics import roc_auc_score

    model, forget, holdout = case
    result = audit_fixed(
        model, forget, holdout, prefix_length=4, suffix_length=None, extract_k=(4,), el_n=(5,), bootstrap=50
    )
    labels = [r["set"] == "forget" for r in result.rows]
    for score in ("loss", "zlib", "min_k", "min_k++"):
        expected = roc_auc_score(labels, [-r[score] for r in result.rows])
        assert result.summary["mia"][score]["auc"] == expected == 1.0  # memorized vs unseen
        assert result.summary["mia"][score]["ci95"] == [1.0, 1.0]
    f = result.summary["forget"]
    assert f["verdicts"]["memorized"] == 3 and f["sampling"]["discoverable"] == 3
    assert f["greedy"]["memorized"] == 3
    assert all(r["loss_pct"] == 0.0 for r in result.set_rows("forget"))


def test_bad_settings_and_sets_are_input_errors(case):
    model, forget, holdout = case
    bad = [
        ({"temperature": 0.0}, "^temperature: "),
        ({"temperature": float("nan")}, "^temperature: "),
        ({"top_k": 0}, "^top_k: "),
        ({"top_p": 1.5}, "^top_p: "),
        ({"top_p": 0.0}, "^top_p: "),
        ({"min_k": 0.0}, "^min_k: "),
        ({"attack_confidence": 1.0}, "^attack_confidence: "),
        ({"attack_samples": 0}, "^attack_samples: "),
        ({"prefix_length": 0}, "^prefix_length: "),
        ({"prefix_length": 50}, "tokens, but the audit's settings need at least"),
    ]
    for options, message in bad:
        with pytest.raises(ds_unlearn.InputError, match=message):
            audit_fixed(model, forget, holdout, **{"extract_k": (4,), "el_n": (5,), **options})
    with pytest.raises(ds_unlearn.InputError, match="^holdout row 1: same text as forget row 1"):
        audit_fixed(model, forget, [holdout[0], forget[1]], prefix_length=4, suffix_length=8, extract_k=(4,), el_n=(5,))
    assert AuditSettings(prefix_length=10, suffix_length=None, el_n=(5,), extract_k=(4,)).min_tokens() == 11


# -- TPR at low FPR, two-sided reading, PrivLeak, forget quality, fp32 scores ----


def sklearn_tpr_at(member, nonmember, fpr):
    """The highest TPR of sklearn's ROC curve among its points with FPR <= fpr (members = the
    positive class, flagged when their loss-like score is low)."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    fprs, tprs, _ = roc_curve(labels, -np.r_[member, nonmember], drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
def test_tpr_at_fpr_equals_sklearn_roc_curve(discrete):
    from ds_unlearn.core.mia import tpr_at_fpr, tpr_at_fpr_figures

    rng = np.random.default_rng(4)
    member, nonmember = rng.normal(-0.8, 1, 300), rng.normal(0, 1, 1000)
    if discrete:  # MA-like scores: most values tied
        member, nonmember = np.round(member * 2) / 2, np.round(nonmember * 2) / 2
    for fpr in (0.001, 0.01, 0.05, 0.2):
        assert tpr_at_fpr(member, nonmember, fpr) == pytest.approx(sklearn_tpr_at(member, nonmember, fpr), abs=1e-12)
    # The interval: percentiles of the same statistic on the resamples roc_auc_interval draws.
    figures = tpr_at_fpr_figures(member, nonmember, resamples=40, seed=9)
    draw = np.random.default_rng(9)
    ms = member[draw.integers(0, len(member), (40, len(member)))]
    ns = nonmember[draw.integers(0, len(nonmember), (40, len(nonmember)))]
    for fpr in (0.001, 0.01, 0.05):
        per_resample = [sklearn_tpr_at(m, n, fpr) for m, n in zip(ms, ns)]
        entry = figures[str(fpr)]
        assert entry["tpr"] == pytest.approx(sklearn_tpr_at(member, nonmember, fpr), abs=1e-12)
        assert entry["ci95"] == pytest.approx(list(np.percentile(per_resample, [2.5, 97.5])), abs=1e-12)
        assert "reason" not in entry


def test_tpr_at_fpr_needs_one_over_fpr_nonmembers():
    from ds_unlearn.core.mia import tpr_at_fpr, tpr_at_fpr_figures

    member, nonmember = np.arange(10.0), np.arange(5.0, 24.0)  # 19 non-members
    figures = tpr_at_fpr_figures(member, nonmember, resamples=10)
    for fpr, need in (("0.001", 1000), ("0.01", 100), ("0.05", 20)):
        assert figures[fpr] == {
            "tpr": None,
            "ci95": None,
            "reason": f"needs at least {need} non-members (1/FPR), the holdout has 19",
        }
    assert tpr_at_fpr(member, nonmember, 0.05) is None
    twenty = np.arange(5.0, 25.0)  # 20 non-members: 5% FPR = one false positive allowed
    assert tpr_at_fpr(member, twenty, 0.05) == sklearn_tpr_at(member, twenty, 0.05) == 0.6  # members 0..5 < 6
    assert tpr_at_fpr_figures(member, twenty, resamples=0)["0.05"] == {"tpr": 0.6, "ci95": None}


def test_two_sided_reading_privleak_and_forget_quality():
    from scipy.stats import ks_2samp

    from ds_unlearn.core.mia import forget_quality, privleak, ref_score, two_sided

    assert two_sided(0.9, [0.7, 0.99]) == {"distinguishable": True, "direction": "members lower"}
    assert two_sided(0.00002, [0.0, 0.1]) == {"distinguishable": True, "direction": "members higher"}
    assert two_sided(0.55, [0.3, 0.8]) == {"distinguishable": False, "direction": None}
    assert two_sided(0.5, None) == {"distinguishable": None, "direction": None}
    assert privleak(0.8, 0.5) == pytest.approx(60.0) and privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert privleak(0.7, 0.0) is None
    assert ref_score(2.5, 3.25) == -0.75
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 30), rng.normal(0.5, 1, 25)
    expected = ks_2samp(a, b)
    assert forget_quality(a, b) == {"pvalue": expected.pvalue, "statistic": expected.statistic}


def test_bf16_scores_are_fp32_log_softmax_of_the_bf16_logits():
    """A bf16 model's membership scores come from fp32 log-probabilities of its bf16 logits
    (open-unlearning PR #162: a bf16 log-softmax distorts Min-K% / Min-K%++)."""
    from ds_unlearn.core.passes import PAD_ID, teacher_forced_pass, token_statistics

    vocab = 1024  # a wide vocabulary, where a bf16 log-softmax visibly loses precision
    model = tiny_model("llama", seed=2, vocab_size=vocab).to(torch.bfloat16).eval()
    seqs = random_sequences(3, [18, 12, 15], vocab, seed=8)
    stats = token_statistics(model, seqs)
    tf = teacher_forced_pass(model, seqs)
    result = ds_unlearn.audit(
        model,
        seqs[:2],
        seqs[2:],
        thresholds=ds_unlearn.Thresholds(),  # fixed MA levels: a 1-row holdout places nothing
        prefix_length=4,
        suffix_length=None,
        extract_k=(4,),
        el_n=(5,),
        bootstrap=0,
    )
    # The same right-padded batch the passes run, so the bf16 logits are the very same numbers.
    ids = torch.full((3, 18), PAD_ID)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    assert logits.dtype == torch.bfloat16
    bf16_gap = 0.0
    for i, seq in enumerate(seqs):
        n, target = len(seq) - 1, torch.tensor(seq[1:])
        lp32 = torch.log_softmax(logits[i, :n].float(), -1)
        logp = lp32[torch.arange(n), target].double().numpy()
        p = lp32.exp()
        mu = (p * lp32).sum(-1)
        sigma = ((p * lp32.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        assert stats[i]["logp"] == pytest.approx(logp, rel=1e-6, abs=1e-6)
        assert stats[i]["mu"] == pytest.approx(mu.double().numpy(), rel=1e-6, abs=1e-6)
        assert stats[i]["sigma"] == pytest.approx(sigma.double().numpy(), rel=1e-6, abs=1e-6)
        assert tf.rows[i][1] == pytest.approx(-logp, rel=1e-6, abs=1e-6)
        row, count = result.rows[i], max(1, int(0.2 * n))
        assert row["loss"] == pytest.approx(-logp.mean(), rel=1e-6)
        assert row["min_k"] == pytest.approx(-np.sort(logp)[:count].mean(), rel=1e-6)
        z = (logp - mu.double().numpy()) / sigma.double().numpy()
        assert row["min_k++"] == pytest.approx(-np.sort(z)[:count].mean(), rel=1e-5)
        lp16 = torch.log_softmax(logits[i, :n], -1)[torch.arange(n), target].double().numpy()
        bf16_gap = max(bf16_gap, float(np.abs(lp16 - logp).max()))
    assert bf16_gap > 1e-2  # a bf16 log-softmax would fail the 1e-6 checks above
