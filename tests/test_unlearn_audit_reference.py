"""The end-of-run audit of ``ds-unlearn unlearn`` takes ``--reference`` and ``--retrained`` as
``ds-unlearn audit`` does: the ref attack, TPR at low FPR, PrivLeak and
forget quality in report.json and TensorBoard; bad companions are one line, exit 2, nothing written."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.toy import random_sequences, save_model, tiny_model

from .conftest import VOCAB, unlearn_args, write_jsonl
from .test_unlearn import tensorboard_scalars, tensorboard_tags


def hand_losses(directory, sequences):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        return np.asarray(
            [
                float(
                    torch.nn.functional.cross_entropy(
                        model(input_ids=torch.tensor([s])).logits[0, :-1], torch.tensor(s[1:])
                    )
                )
                for s in sequences
            ]
        )


@pytest.fixture()
def nonmembers(tmp_path):
    seqs = random_sequences(6, 24, VOCAB, seed=23)
    return write_jsonl(tmp_path / "nonmembers.jsonl", [{"id": f"n{i}", "input_ids": s} for i, s in enumerate(seqs)])


def test_unlearn_audit_with_reference_and_retrained(unlearn_case, nonmembers, tmp_path):
    reference = save_model(tiny_model("llama", seed=8, vocab_size=VOCAB), tmp_path / "reference")
    retrained = save_model(tiny_model("llama", seed=9, vocab_size=VOCAB), tmp_path / "retrained")
    out = tmp_path / "ga"
    extra = ["--audit_holdout", nonmembers, "--reference", reference, "--retrained", retrained, "--audit", "after"]
    assert main(["unlearn", *unlearn_args(unlearn_case, out, *extra, "--num_train_epochs", 1)]) == 0
    audit = json.loads((out / "report.json").read_text())["audit"]
    assert audit["reference_model"] == str(reference) and audit["retrained_model"] == str(retrained)
    after = audit["after"]
    rows = read_jsonl(out / "audit_after.jsonl")
    forget = [r["input_ids"] for r in read_jsonl(unlearn_case["forget"])]
    sequences = forget + [r["input_ids"] for r in read_jsonl(nonmembers)]
    ref_loss, retrained_loss = hand_losses(reference, sequences), hand_losses(retrained, sequences)
    loss = np.asarray([r["loss"] for r in rows])
    assert [r["ref"] for r in rows] == pytest.approx(list(loss - ref_loss), rel=1e-5, abs=1e-5)
    labels = np.r_[np.ones(4), np.zeros(6)]
    assert after["mia"]["ref"]["auc"] == pytest.approx(roc_auc_score(labels, -(loss - ref_loss)))
    auc_retrained = roc_auc_score(labels, -retrained_loss)
    assert after["mia_retrained"]["loss"]["auc"] == pytest.approx(auc_retrained)
    leak = (after["mia"]["loss"]["auc"] - auc_retrained) / auc_retrained * 100
    assert after["privleak"]["loss"] == pytest.approx(leak)
    assert after["forget_quality"] == pytest.approx(ks_2samp(loss[:4], retrained_loss[:4]).pvalue)
    # 6 non-members: no FPR of 5% or below can be estimated, and the report says why.
    assert after["tpr_at_fpr"]["ref"]["0.05"]["reason"] == "needs at least 20 non-members (1/FPR), the holdout has 6"
    d = after["auc_difference"]["loss"]
    assert d["delta"] == pytest.approx(after["mia"]["loss"]["auc"] - auc_retrained) and len(d["ci95"]) == 2
    scalars, _ = tensorboard_tags(out)
    assert {"audit/auc_ref_after", "audit/privleak_loss_after", "audit/forget_quality_after"} <= scalars
    at = sum(v["indistinguishable"] for v in after["auc_difference"].values())
    assert [v for _, v in tensorboard_scalars(out, "audit/attacks_at_retrained_after")] == [at]


@pytest.mark.parametrize("case", ["missing", "other vocabulary", "audit none", "no non-members"])
def test_bad_companion_is_one_line_exit_2_nothing_written(case, unlearn_case, nonmembers, tmp_path, capsys):
    wider = save_model(tiny_model("llama", seed=8, vocab_size=VOCAB + 16), tmp_path / "wider")
    flags, message = {
        "missing": (
            ["--audit_holdout", nonmembers, "--retrained", tmp_path / "nope"],
            f"retrained: {tmp_path / 'nope'} is not a model directory (no config.json)",
        ),
        "other vocabulary": (
            ["--audit_holdout", nonmembers, "--reference", wider],
            f"reference: {wider} has a vocabulary of 80 tokens, --model 64 (it must share --model's tokenizer)",
        ),
        "audit none": (
            ["--audit_holdout", nonmembers, "--reference", wider, "--audit", "none"],
            "reference: not read with audit none",
        ),
        "no non-members": (["--reference", wider], "reference: the end-of-run audit needs non-members"),
    }[case]
    args = unlearn_args(unlearn_case, tmp_path / "out", *flags)
    if case == "no non-members":  # unlearn_args passes a holdout: drop it
        i = args.index("--holdout")
        del args[i : i + 2]
    capsys.readouterr()
    assert main(["unlearn", *map(str, args)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_runs_sharing_a_companion_cache_reuse_what_their_audit_would_compute(unlearn_case, nonmembers, tmp_path):
    """The demo's methods share one CompanionCache: a later run's audit reuses the reference losses and
    the retrained audit (no model loaded again) and reads the same figures as if computed by hand; a run
    whose audit asks something else (other non-members) computes its own."""
    from ds_unlearn.commands.unlearn import parse_config
    from ds_unlearn.unlearn.audit import CompanionCache
    from ds_unlearn.unlearn.run import run_unlearning

    reference = save_model(tiny_model("llama", seed=8, vocab_size=VOCAB), tmp_path / "reference")
    retrained = save_model(tiny_model("llama", seed=9, vocab_size=VOCAB), tmp_path / "retrained")
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [{"id": f"o{i}", "input_ids": s} for i, s in enumerate(random_sequences(6, 24, VOCAB, seed=24))],
    )
    cache, audits = CompanionCache(), {}
    for name, method, holdout in (("ga", "ga", nonmembers), ("sga", "sga", nonmembers), ("other", "ga", other)):
        extra = ["--audit_holdout", holdout, "--reference", reference, "--retrained", retrained, "--audit", "after"]
        argv = unlearn_args(unlearn_case, tmp_path / name, *extra, "--method", method, "--num_train_epochs", 1)
        audits[name] = run_unlearning(parse_config([str(a) for a in argv]), audit_cache=cache).report["audit"]
    assert audits["ga"]["companions"] == {"reference": "computed", "retrained": "computed"}
    assert audits["sga"]["companions"] == {"reference": "reused", "retrained": "reused"}
    assert audits["other"]["companions"] == {"reference": "computed", "retrained": "computed"}
    # The reused figures are the ones computed by hand for the sga run's model.
    rows = read_jsonl(tmp_path / "sga" / "audit_after.jsonl")
    forget = [r["input_ids"] for r in read_jsonl(unlearn_case["forget"])]
    sequences = forget + [r["input_ids"] for r in read_jsonl(nonmembers)]
    loss = np.asarray([r["loss"] for r in rows])
    ref_loss, retrained_loss = hand_losses(reference, sequences), hand_losses(retrained, sequences)
    assert [r["ref"] for r in rows] == pytest.approx(list(loss - ref_loss), rel=1e-5, abs=1e-5)
    after, labels = audits["sga"]["after"], np.r_[np.ones(4), np.zeros(6)]
    assert after["mia_retrained"]["loss"]["auc"] == pytest.approx(roc_auc_score(labels, -retrained_loss))
    assert after["forget_quality"] == pytest.approx(ks_2samp(loss[:4], retrained_loss[:4]).pvalue)
