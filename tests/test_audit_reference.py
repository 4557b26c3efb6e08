"""Through ``ds_unlearn.audit``: the reference-model attack, TPR at low FPR,
the two-sided reading, and the figures against a retrained model, each held equal to an
independent computation (plain forward passes, scikit-learn, scipy)."""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score, roc_curve

import ds_unlearn
from ds_unlearn.core.audit import sequence_losses
from ds_unlearn.core.toy import memorize, random_sequences, tiny_model

VOCAB = 64
FAST = {"prefix_length": 4, "suffix_length": None, "extract_k": (4,), "el_n": (5,), "bootstrap": 200}


@pytest.fixture(scope="module")
def case():
    """A float64 Llama that memorized 4 forget sequences, a reference that never saw them (the
    same architecture, untrained) and a 'retrained' one trained on 4 other sequences; 24 unseen
    holdout sequences (enough for a 5% FPR)."""
    seqs = random_sequences(32, 16, VOCAB, seed=31)
    forget, other, holdout = seqs[:4], seqs[4:8], seqs[8:]
    model = memorize(tiny_model("llama", seed=3, vocab_size=VOCAB), forget, steps=60).double().eval()
    reference = tiny_model("llama", seed=4, vocab_size=VOCAB).double().eval()
    retrained = memorize(tiny_model("llama", seed=3, vocab_size=VOCAB), other, steps=60).double().eval()
    return model, reference, retrained, forget, holdout


def hand_loss(model, seq) -> float:
    """Mean next-token NLL of one sequence, alone, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])))


def labels_of(rows):
    return np.asarray([r["set"] == "forget" for r in rows], dtype=int)


def test_ref_attack_is_loss_minus_the_reference_loss(case):
    model, reference, _, forget, holdout = case
    result = ds_unlearn.audit(model, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=reference, **FAST)
    for row, seq in zip(result.rows, forget + holdout):
        expected = hand_loss(model, seq) - hand_loss(reference, seq)
        assert row["ref"] == pytest.approx(expected, rel=1e-9, abs=1e-12), row["id"]
    refs = np.asarray([r["ref"] for r in result.rows])
    holdout_refs = refs[len(forget) :]
    assert result.rows[0]["ref_pct"] == pytest.approx(100 * np.mean(holdout_refs <= refs[0]))
    entry = result.summary["mia"]["ref"]
    assert entry["auc"] == roc_auc_score(labels_of(result.rows), -refs) == 1.0
    assert entry["distinguishable"] is True and entry["direction"] == "members lower"
    assert set(result.summary["tpr_at_fpr"]) == {"loss", "zlib", "min_k", "min_k++", "ref"}
    # Precomputed reference losses (how the CLI keeps one model in memory) give the same rows.
    losses = sequence_losses(reference, forget + holdout)
    assert losses == pytest.approx([hand_loss(reference, s) for s in forget + holdout], rel=1e-9)
    again = ds_unlearn.audit(model, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=losses, **FAST)
    assert [r["ref"] for r in again.rows] == pytest.approx(list(refs), rel=1e-12)
    assert again.summary["mia"]["ref"] == entry and again.summary["tpr_at_fpr"] == result.summary["tpr_at_fpr"]


def test_tpr_at_fpr_of_every_attack_equals_sklearn_roc_curve(case):
    model, reference, _, forget, holdout = case
    result = ds_unlearn.audit(model, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=reference, **FAST)
    labels = labels_of(result.rows)
    for score, per_fpr in result.summary["tpr_at_fpr"].items():
        fpr, tpr, _ = roc_curve(labels, [-r[score] for r in result.rows], drop_intermediate=False)
        # 24 non-members: 5% FPR allows one false positive; 1% and 0.1% cannot be estimated.
        assert per_fpr["0.05"]["tpr"] == tpr[fpr <= 0.05].max() == 1.0, score
        assert per_fpr["0.05"]["ci95"] == [1.0, 1.0]
        for small, need in (("0.01", 100), ("0.001", 1000)):
            assert per_fpr[small]["tpr"] is None
            assert per_fpr[small]["reason"] == f"needs at least {need} non-members (1/FPR), the holdout has 24"


def test_against_a_retrained_model(case):
    """AUC under the retrained model, PrivLeak and forget quality from independent computations."""
    model, reference, retrained, forget, holdout = case
    result = ds_unlearn.audit(
        model,
        forget,
        holdout,
        thresholds=ds_unlearn.Thresholds(),
        reference=reference,
        retrained=retrained,
        **FAST,
    )
    s = result.summary
    labels = np.r_[np.ones(len(forget)), np.zeros(len(holdout))]
    retrained_loss = np.asarray([hand_loss(retrained, q) for q in forget + holdout])
    reference_loss = np.asarray([hand_loss(reference, q) for q in forget + holdout])
    expected = {
        "loss": roc_auc_score(labels, -retrained_loss),
        "ref": roc_auc_score(labels, -(retrained_loss - reference_loss)),
    }
    assert set(s["privleak"]) == set(s["mia_retrained"]) == {"loss", "zlib", "min_k", "min_k++", "ref"}
    for score, auc_retrained in expected.items():
        assert s["mia_retrained"][score]["auc"] == pytest.approx(auc_retrained, abs=1e-12)
        leak = (s["mia"][score]["auc"] - auc_retrained) / auc_retrained * 100
        assert s["privleak"][score] == pytest.approx(leak, rel=1e-12)
        assert s["privleak"][score] > 0  # the audited model still remembers what the retrained never saw
    assert s["mia_retrained"]["loss"]["ci95"] is not None and "distinguishable" in s["mia_retrained"]["loss"]
    # The paired difference: the same AUCs subtracted; the audited model memorized the forget set,
    # so every attack tells it from the retrained model.
    for score, d in s["auc_difference"].items():
        assert d["delta"] == pytest.approx(s["mia"][score]["auc"] - s["mia_retrained"][score]["auc"], abs=1e-12)
        assert d["ci95"][0] > 0 and d["indistinguishable"] is False, score
    ks = ks_2samp([hand_loss(model, q) for q in forget], retrained_loss[: len(forget)])
    assert s["forget_quality"] == pytest.approx(ks.pvalue, rel=1e-9)
    assert s["forget_quality_ks"]["statistic"] == pytest.approx(ks.statistic) and s["forget_quality"] < 0.05
    # The retrained model's AuditResult in place of the model gives the same figures.
    theirs = ds_unlearn.audit(
        retrained, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=reference, greedy=False, **FAST
    )
    again = ds_unlearn.audit(
        model, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=reference, retrained=theirs, **FAST
    )
    assert again.summary["mia_retrained"] == s["mia_retrained"]
    # The retrained model's TPR at low FPR, as its own audit reads it (the same seeds: the same draws).
    assert s["tpr_at_fpr_retrained"] == again.summary["tpr_at_fpr_retrained"] == theirs.summary["tpr_at_fpr"]
    assert s["tpr_at_fpr_retrained"]["loss"]["0.05"]["tpr"] < s["tpr_at_fpr"]["loss"]["0.05"]["tpr"]
    assert again.summary["privleak"] == pytest.approx(s["privleak"], rel=1e-12)
    assert again.summary["forget_quality"] == pytest.approx(s["forget_quality"], rel=1e-12)


def test_a_model_audited_against_itself_retrained_reads_zero_and_indistinguishable(case):
    _, _, retrained, forget, holdout = case
    result = ds_unlearn.audit(
        retrained, forget, holdout, thresholds=ds_unlearn.Thresholds(), retrained=retrained, **FAST
    )
    assert all(v == 0.0 for v in result.summary["privleak"].values())
    assert all(
        d == {"delta": 0.0, "ci95": [0.0, 0.0], "indistinguishable": True}
        for d in result.summary["auc_difference"].values()
    )
    assert result.summary["forget_quality"] == 1.0
    # Neither model saw forget or holdout: no attack can tell them apart.
    for score, entry in result.summary["mia"].items():
        assert entry["ci95"][0] < 0.5 < entry["ci95"][1], score
        assert entry["distinguishable"] is False and entry["direction"] is None


def test_another_vocabulary_is_refused_before_any_compute(case, monkeypatch):
    model, _, _, forget, holdout = case
    wider = tiny_model("llama", seed=4, vocab_size=VOCAB + 16).double().eval()
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    for option in ("reference", "retrained"):
        with pytest.raises(ds_unlearn.InputError, match=f"^{option}: vocabulary of 80 tokens, but the audited"):
            ds_unlearn.audit(model, forget, holdout, thresholds=ds_unlearn.Thresholds(), **{option: wider}, **FAST)
    with pytest.raises(ds_unlearn.InputError, match="^reference: 3 reference losses for 28 sequences"):
        ds_unlearn.audit(model, forget, holdout, thresholds=ds_unlearn.Thresholds(), reference=[1.0, 2.0, 3.0], **FAST)
    assert calls == []


def test_the_retrained_section_names_intervals_only_when_the_audit_drew_them():
    from ds_unlearn.core.audit_report import retrained_section

    def summary(ci):
        entry = {"auc": 0.6, "ci95": ci}
        return {
            "mia": {"loss": entry},
            "mia_retrained": {"loss": {"auc": 0.5, "ci95": ci}},
            "privleak": {"loss": 20.0},
            "auc_difference": {"loss": {"delta": 0.1, "ci95": ci, "indistinguishable": None if ci is None else True}},
            "forget_quality": 0.3,
            "forget_quality_ks": {"statistic": 0.2, "forget_count": 4},
        }

    drawn = "\n".join(retrained_section(summary([-0.1, 0.3])))
    assert "| loss | 0.600 | 0.500 [-0.100, 0.300] | 0.100 [-0.100, 0.300] | 20.0 |" in drawn
    assert "AUC - retrained [paired 95% CI]" in drawn and "paired bootstrap" in drawn
    bare = "\n".join(retrained_section(summary(None)))  # --bootstrap 0
    assert "| score | AUC | AUC retrained | AUC - retrained | PrivLeak % |" in bare
    assert "| loss | 0.600 | 0.500 | 0.100 | 20.0 |" in bare and "paired bootstrap" not in bare
