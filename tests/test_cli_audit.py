"""``ds-unlearn audit`` on one process: outputs, --baseline, privacy, and every bad input (exit 2,
one line, nothing written, before any model compute)."""

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.audit_report import AUDIT_OUTPUTS
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.toy import save_model, tiny_model

from .conftest import VOCAB, write_jsonl

# Short sequences: 8-token prefix, 16-token suffix for the sampling figures; K=8, EL_5. The ICML
# code's fixed MA verdicts: 3 holdout rows are too few to place a sequence among.
FAST = ["--prefix_length", "8", "--suffix_length", "16", "--extract_k", "8", "--el_n", "5", "--bootstrap", "100"]
FAST += ["--memorized_threshold", "0.6", "--over_unlearned_threshold", "0.15"]


@pytest.fixture()
def sets(tmp_path, token_sets):
    forget = write_jsonl(
        tmp_path / "forget.jsonl", [{"id": f"f{i}", "input_ids": s} for i, s in enumerate(token_sets["memorized"])]
    )
    holdout = write_jsonl(
        tmp_path / "holdout.jsonl", [{"id": f"h{i}", "input_ids": s} for i, s in enumerate(token_sets["unseen"])]
    )
    return forget, holdout


def audit_args(model, forget, holdout, out, *extra):
    return ["audit", "--model", str(model), "--forget", str(forget), "--holdout", str(holdout), "--out", str(out)] + [
        *FAST,
        *map(str, extra),
    ]


def test_audit_writes_every_output(model_dir, sets, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(audit_args(model_dir, *sets, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(AUDIT_OUTPUTS)
    rows = read_jsonl(out / "audit.jsonl")
    assert [(r["set"], r["id"]) for r in rows] == [("forget", f"f{i}") for i in range(3)] + [
        ("holdout", f"h{i}") for i in range(3)
    ]
    assert list(rows[0]) == [
        "id", "set", "n_tokens", "loss", "ma", "el_5", "max_verbatim", "extractable_k8",
        "zlib", "min_k", "min_k++", "log10_p", "samples_50", "samples_99", "discoverable", "outside_kept",
        "loss_pct", "zlib_pct", "min_k_pct", "min_k++_pct", "verdict",
    ]  # fmt: skip
    forget = [r for r in rows if r["set"] == "forget"]
    # The model memorized the forget set: greedy and sampling both reproduce it.
    assert all(r["ma"] == 1.0 and r["verdict"] == "memorized" and r["discoverable"] for r in forget)
    assert all(r["loss_pct"] == 0.0 for r in forget)  # lower loss than every holdout sequence
    summary = json.loads((out / "audit.json").read_text())
    for score in ("loss", "zlib", "min_k", "min_k++"):
        assert summary["mia"][score]["auc"] == 1.0 and summary["mia"][score]["ci95"] == [1.0, 1.0]
    assert summary["forget"]["verdicts"] == {"memorized": 3, "discoverable": 0, "over-unlearned": 0, "unseen-like": 0}
    assert summary["forget"]["greedy"]["memorized"] == 3 and summary["forget"]["sampling"]["discoverable"] == 3
    assert summary["settings"]["prefix_length"] == 8 and summary["settings"]["suffix_length"] == 16
    assert summary["model"] == str(model_dir)
    md = (out / "audit.md").read_text()
    assert "| forget | 3 | 0 | 0 | 0 |" in md and "| loss | 1.000 [1.000, 1.000]" in md
    assert re.search(r"-0\.0+(?!\d)", md) is None  # log10 p just below 0 reads 0.0, not -0.0
    assert "membership AUC forget vs holdout (3 holdout sequences): loss 1.000" in capsys.readouterr().out


def test_baseline_reports_change_per_sequence(model_dir, sets, tmp_path):
    """The memorized model as the baseline of an untrained one: the before/after table of an
    unlearning run that worked."""
    after = save_model(tiny_model("llama", seed=5, vocab_size=VOCAB), tmp_path / "after")
    out = tmp_path / "audit"
    assert main(audit_args(after, *sets, out, "--baseline", model_dir, "--top_k", 40)) == 0
    rows = read_jsonl(out / "audit.jsonl")
    summary = json.loads((out / "audit.json").read_text())
    assert summary["baseline"]["mia"]["loss"]["auc"] == 1.0
    assert summary["baseline"]["forget"]["verdicts"]["memorized"] == 3
    for row in rows:
        assert set(row["change"]) == {"loss", "ma", "zlib", "min_k", "min_k++", "log10_p"}
        if row["set"] == "forget":
            assert row["baseline"]["verdict"] == "memorized" and row["baseline"]["ma"] == 1.0
            assert row["change"]["ma"] == pytest.approx(row["ma"] - 1.0)
            assert row["change"]["loss"] == pytest.approx(row["loss"] - row["baseline"]["loss"])
            assert row["verdict"] != "memorized" and not row["discoverable"]
            if math.isinf(row["log10_p"]):  # top-k 40 of 64 can exclude a true token
                assert row["change"]["log10_p"] is None
    md = (out / "audit.md").read_text()
    assert "memorized → " in md and "AUC before" in md


def test_forget_text_never_appears_in_any_output(model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer over the tiny vocabulary: "t5 t9 ..." -> ids [5, 9, ...].
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(model)
    text = lambda seed: " ".join(f"t{(seed * 7 + 3 * i) % 63 + 1}" for i in range(30))
    forget_text = [text(s) for s in (1, 2, 3)]
    forget = write_jsonl(tmp_path / "f.jsonl", [{"id": f"rec{i}", "text": t} for i, t in enumerate(forget_text)])
    holdout = write_jsonl(tmp_path / "h.jsonl", [{"id": f"h{i}", "text": text(s)} for i, s in enumerate((4, 5, 6))])
    out = tmp_path / "audit"
    assert main(audit_args(model, forget, holdout, out)) == 0
    written = list(out.iterdir())
    assert len(written) == len(AUDIT_OUTPUTS)
    for path in written:
        blob = path.read_bytes()
        for t in forget_text:
            assert t.encode() not in blob and t[:14].encode() not in blob, path.name


def word_tokenizer(prefix="t"):
    """A word-level tokenizer over the tiny vocabulary: "t5 t9 ..." -> ids [5, 9, ...]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(VOCAB)}, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{prefix}0")


def _bad_cases(tmp_path, forget, holdout, model_dir):
    rows = [json.loads(l) for l in forget.read_text().splitlines()]
    wider = save_model(tiny_model("llama", seed=5, vocab_size=VOCAB + 16), tmp_path / "wider")
    with_tok, other_tok = tmp_path / "with_tok", tmp_path / "other_tok"
    for directory, prefix in ((with_tok, "t"), (other_tok, "u")):
        shutil.copytree(model_dir, directory)
        word_tokenizer(prefix).save_pretrained(directory)
    # Two rows each: a one-row holdout is refused first (its AUC bootstrap cannot vary).
    other = {"id": "other", "input_ids": list(range(41, 1, -1))}
    overlap_id = write_jsonl(tmp_path / "oid.jsonl", [{"id": "f1", "input_ids": list(range(1, 41))}, other])
    same_text = write_jsonl(tmp_path / "same.jsonl", [{"id": "new", "input_ids": rows[2]["input_ids"]}, other])
    base = [str(model_dir), str(forget), str(holdout)]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return {
        "holdout not given": (
            ["audit", "--model", base[0], "--forget", base[1], "--out", str(tmp_path / "out")],
            "--holdout: required",
        ),
        "holdout missing": ([base[0], base[1], str(tmp_path / "nope.jsonl")], "--holdout: no such file"),
        "overlap by id": ([base[0], base[1], str(overlap_id)], "--holdout row 0: id 'f1' is also --forget row 1"),
        "identical text": ([base[0], base[1], str(same_text)], "--holdout row 0: same text as --forget row 2"),
        "temperature": ([*base, "--temperature", "0"], "--temperature: must be a positive finite number"),
        "top_p": ([*base, "--top_p", "1.5"], "--top_p: must lie in (0, 1]"),
        "top_k": ([*base, "--top_k", "0"], "--top_k: must be a positive integer"),
        "confidence": ([*base, "--attack_confidence", "1"], "--attack_confidence: must lie in (0, 1)"),
        "too short": (
            [*base, "--prefix_length", "20"],
            "--forget row 1: 30 tokens, but the audit's settings need at least 36 (set by --prefix_length",
        ),
        "thresholds": ([*base, "--memorized_threshold", "0.1"], "--memorized_threshold: need"),
        "holdout too small to calibrate": (
            [*base, "--band_on", "ma,loss"],
            "--holdout: 3 row(s) cannot calibrate verdicts at quantile 0.025 per side and score: it needs at least 40",
        ),
        "unknown band score": ([*base, "--band_on", "ma,perplexity"], "band_on: must be a comma list of ma, loss"),
        "eval include path": ([*base, "--eval_include_path", str(tmp_path)], "--eval_include_path given without"),
        "baseline not a checkpoint": (
            [*base, "--baseline", str(tmp_path / "nope")],
            f"--baseline: {tmp_path / 'nope'} is not a model directory",
        ),
        "negative seed": ([*base, "--seed", "-1"], "argument --seed: must lie in [0, 4294967295], got -1"),
        "reference missing": (
            [*base, "--reference", str(tmp_path / "nope")],
            f"--reference: {tmp_path / 'nope'} is not a model directory (no config.json)",
        ),
        "retrained missing": (
            [*base, "--retrained", str(tmp_path / "nope")],
            f"--retrained: {tmp_path / 'nope'} is not a model directory (no config.json)",
        ),
        "reference with another vocabulary": (
            [*base, "--reference", str(wider)],
            f"--reference: {wider} has a vocabulary of 80 tokens, --model 64 (it must share --model's tokenizer)",
        ),
        "retrained with another vocabulary": (
            [*base, "--retrained", str(wider)],
            f"--retrained: {wider} has a vocabulary of 80 tokens, --model 64",
        ),
        "reference with another tokenizer": (
            [str(with_tok), base[1], base[2], "--reference", str(other_tok)],
            f"--reference: {other_tok} ships another tokenizer than --model (token ids differ)",
        ),
        "out under a file": (
            [*base, "--out", str(a_file / "x")],
            f"--out: cannot create {a_file / 'x'}: {a_file} is a file",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "holdout not given",
        "holdout missing",
        "overlap by id",
        "identical text",
        "temperature",
        "top_p",
        "top_k",
        "confidence",
        "too short",
        "thresholds",
        "eval include path",
        "baseline not a checkpoint",
        "negative seed",
        "out under a file",
        "reference missing",
        "retrained missing",
        "reference with another vocabulary",
        "retrained with another vocabulary",
        "reference with another tokenizer",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, model_dir, sets, tmp_path, monkeypatch, capsys):
    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("ds_unlearn.commands.audit.load_for_inference", no_model)
    spec, message = _bad_cases(tmp_path, *sets, model_dir)[case]
    argv = spec if spec[0] == "audit" else audit_args(*spec[:3], tmp_path / "out", *spec[3:])
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_outputs_need_overwrite_in_a_real_process(model_dir, sets, tmp_path):
    out = tmp_path / "audit"
    out.mkdir()
    (out / "audit.json").write_text("keep me\n")
    (out / "notes.txt").write_text("the user's own file\n")
    cmd = [sys.executable, "-m", "ds_unlearn", *audit_args(model_dir, *sets, out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds an earlier run (audit.json); pass --overwrite" in result.stderr
    assert (out / "audit.json").read_text() == "keep me\n" and len(list(out.iterdir())) == 2
    assert main([*audit_args(model_dir, *sets, out), "--overwrite", "--bootstrap", "0"]) == 0
    assert json.loads((out / "audit.json").read_text())["mia"]["loss"]["ci95"] is None
    assert (out / "notes.txt").exists()


def test_a_repeated_holdout_row_is_noted_once_and_still_audited(model_dir, sets, tmp_path, capsys):
    forget, holdout = sets
    rows = read_jsonl(holdout)
    again = write_jsonl(tmp_path / "holdout_again.jsonl", [*rows, {**rows[0], "id": "h-again"}])
    out = tmp_path / "audit"
    assert main(audit_args(model_dir, forget, again, out)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [
        "ds-unlearn audit: note: --holdout: 1 row(s) hold the same tokens as an earlier row: "
        "row 3 ('h-again') repeats row 0 ('h0'); each copy counts as its own sequence "
        "(deduplicate the file to count it once)"
    ]
    assert json.loads((out / "audit.json").read_text())["holdout"]["count"] == 4


def hand_losses(directory, sequences):
    """Mean next-token NLL of each sequence, alone, under the saved checkpoint (float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
            out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:]))))
    return np.asarray(out)


def test_reference_and_retrained_figures_in_every_output(model_dir, token_sets, tmp_path, capsys):
    """--reference adds the ref attack; --retrained its AUCs, PrivLeak and forget quality; every
    figure against an independent computation. 20 holdout rows: TPR at 5% FPR is a number,
    at 1% and 0.1% it cannot be estimated."""
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score, roc_curve

    from ds_unlearn.core.toy import random_sequences

    forget_seqs = token_sets["memorized"]
    holdout_seqs = random_sequences(20, 30, VOCAB, seed=41)
    forget = write_jsonl(tmp_path / "f.jsonl", [{"id": f"f{i}", "input_ids": s} for i, s in enumerate(forget_seqs)])
    holdout = write_jsonl(tmp_path / "h.jsonl", [{"id": f"h{i}", "input_ids": s} for i, s in enumerate(holdout_seqs)])
    reference = save_model(tiny_model("llama", seed=6, vocab_size=VOCAB), tmp_path / "reference")
    retrained = save_model(tiny_model("llama", seed=7, vocab_size=VOCAB), tmp_path / "retrained")
    out = tmp_path / "audit"
    args = audit_args(model_dir, forget, holdout, out, "--reference", reference, "--retrained", retrained)
    assert main([*args, "--suffix_length", "rest"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(AUDIT_OUTPUTS) and "roc.png" in AUDIT_OUTPUTS
    rows = read_jsonl(out / "audit.jsonl")
    summary = json.loads((out / "audit.json").read_text())
    sequences = forget_seqs + holdout_seqs
    loss, ref_loss, retrained_loss = (hand_losses(d, sequences) for d in (model_dir, reference, retrained))
    assert [r["loss"] for r in rows] == pytest.approx(list(loss), rel=1e-5, abs=1e-6)
    assert [r["ref"] for r in rows] == pytest.approx(list(loss - ref_loss), rel=1e-5, abs=1e-5)
    labels = np.r_[np.ones(3), np.zeros(20)]
    ref = np.asarray([r["ref"] for r in rows])
    assert summary["mia"]["ref"]["auc"] == roc_auc_score(labels, -ref) == 1.0
    assert summary["mia"]["ref"]["direction"] == "members lower"
    for score, per_fpr in summary["tpr_at_fpr"].items():
        fpr, tpr, _ = roc_curve(labels, [-r[score] for r in rows], drop_intermediate=False)
        assert per_fpr["0.05"]["tpr"] == tpr[fpr <= 0.05].max(), score
        assert per_fpr["0.01"] == {
            "tpr": None,
            "ci95": None,
            "reason": "needs at least 100 non-members (1/FPR), the holdout has 20",
        }
    auc_retrained = roc_auc_score(labels, -retrained_loss)
    assert summary["mia_retrained"]["loss"]["auc"] == pytest.approx(auc_retrained)
    assert summary["mia_retrained"]["ref"]["auc"] == pytest.approx(roc_auc_score(labels, -(retrained_loss - ref_loss)))
    assert summary["privleak"]["loss"] == pytest.approx((1.0 - auc_retrained) / auc_retrained * 100, rel=1e-6)
    assert summary["forget_quality"] == pytest.approx(ks_2samp(loss[:3], retrained_loss[:3]).pvalue, rel=1e-6)
    assert summary["reference_model"] == str(reference) and summary["retrained_model"] == str(retrained)
    md = (out / "audit.md").read_text()
    assert "| ref | 1.000 [1.000, 1.000] | distinguishable: members lower" in md
    assert "Cannot be estimated at 0.1%, 1% FPR: the holdout has 20 sequences" in md
    assert "### Against the retrained model" in md and "Forget quality (TOFU): KS-test p-value" in md
    # The difference's paired interval: the audited model's forget set reads member-like by loss
    # (AUC 1.0) where the random retrained model's does not.
    d = summary["auc_difference"]["loss"]
    assert d["delta"] == pytest.approx(1.0 - auc_retrained) and d["ci95"][0] > 0 and not d["indistinguishable"]
    assert f"| loss | 1.000 | {summary['mia_retrained']['loss']['auc']:.3f} [" in md
    assert f"| {d['delta']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] |" in md
    assert "- `roc.png`: ROC curve of every membership attack" in md
    printed = capsys.readouterr().out
    assert "ref 1.000" in printed and "PrivLeak vs the retrained model: loss " in printed
    expected = ", ".join(s for s, v in summary["auc_difference"].items() if v["indistinguishable"]) or "none"
    assert f"(the paired 95% interval of AUC - AUC_retrained holds 0): {expected}\n" in printed
