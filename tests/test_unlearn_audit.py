"""``ds-unlearn unlearn`` ends with an audit of the model before and after: membership inference
against text the model never saw and extraction under sampling, in report.json, per-sequence
files and TensorBoard."""

import json

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.toy import random_sequences

from .conftest import VOCAB, unlearn_args, write_jsonl
from .test_unlearn import tensorboard_tags


def test_unlearn_report_holds_the_before_and_after_audit(unlearn_case, tmp_path):
    nonmembers = write_jsonl(
        tmp_path / "nonmembers.jsonl",
        [{"id": f"n{i}", "input_ids": s} for i, s in enumerate(random_sequences(6, 24, VOCAB, seed=23))],
    )
    out = tmp_path / "ga"
    assert main(["unlearn", *unlearn_args(unlearn_case, out, "--audit_holdout", nonmembers)]) == 0
    audit = json.loads((out / "report.json").read_text())["audit"]
    assert audit["nonmembers"] == "audit_holdout"
    assert audit["settings"]["prefix_length"] == 8 and audit["settings"]["suffix_length"] is None
    before, after = audit["before"], audit["after"]
    # Before: 4 memorized forget sequences vs 6 random ones, every score separates them; every
    # forget suffix is likely under sampling.
    assert all(before["mia"][s]["auc"] == 1.0 for s in ("loss", "zlib", "min_k", "min_k++"))
    assert before["forget"]["discoverable"] == 4 and before["nonmember"]["discoverable"] == 0
    # After unlearning, no forget sequence is discoverable with 1000 samples any more.
    assert after["forget"]["discoverable"] == 0
    rows = {name: read_jsonl(out / f"audit_{name}.jsonl") for name in ("before", "after")}
    for name, entry in (("before", before), ("after", after)):
        ids = [(r["set"], r["id"]) for r in rows[name]]
        assert ids == [("forget", f"forget-{i}") for i in range(4)] + [("holdout", f"n{i}") for i in range(6)]
        assert sum(r["discoverable"] for r in rows[name] if r["set"] == "forget") == entry["forget"]["discoverable"]
    # The loss in the audit files is the run's own per-sequence loss, before and after.
    scores_after = read_jsonl(out / "scores_after.jsonl")
    for row, score in zip(rows["after"], scores_after):
        assert abs(row["loss"] - score["loss"]) < 1e-4
    scalars, _ = tensorboard_tags(out)
    assert {"audit/auc_loss_before", "audit/auc_min_k++_after", "audit/discoverable_after"} <= scalars


def test_audit_after_leaves_out_the_input_checkpoint(unlearn_case, tmp_path):
    """--audit after: the unlearned model only (the input checkpoint's audit is known already);
    --audit none: no audit at all."""
    nonmembers = write_jsonl(
        tmp_path / "nonmembers.jsonl",
        [{"id": f"n{i}", "input_ids": s} for i, s in enumerate(random_sequences(6, 24, VOCAB, seed=23))],
    )
    out = tmp_path / "after"
    assert main(["unlearn", *unlearn_args(unlearn_case, out, "--audit_holdout", nonmembers, "--audit", "after")]) == 0
    audit = json.loads((out / "report.json").read_text())["audit"]
    assert "before" not in audit and audit["files"] == ["audit_after.jsonl"]
    assert audit["after"]["forget"]["discoverable"] == 0 and audit["after"]["mia"]["loss"]["auc"] is not None
    assert not (out / "audit_before.jsonl").exists() and len(read_jsonl(out / "audit_after.jsonl")) == 10
    scalars, _ = tensorboard_tags(out)
    assert "audit/auc_loss_after" in scalars and not any(t.endswith("_before") for t in scalars if "audit/" in t)

    out = tmp_path / "none"
    assert main(["unlearn", *unlearn_args(unlearn_case, out, "--audit_holdout", nonmembers, "--audit", "none")]) == 0
    assert json.loads((out / "report.json").read_text())["audit"] == {"skipped": "--audit none"}
    assert not list(out.glob("audit_*.jsonl"))
