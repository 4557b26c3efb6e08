"""The real deepspeed launcher, 2 CPU ranks, ZeRO-3: ``--reference`` and ``--retrained`` give the
same ref attack, TPR at FPR, PrivLeak and forget quality as one process."""

import json
import math

import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.toy import random_sequences, save_model, tiny_model

from .conftest import VOCAB, write_jsonl
from .launcher import REPO, deepspeed_run, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--prefix_length", 8, "--suffix_length", "rest", "--extract_k", 8, "--el_n", 5, "--batch_size", 3]
ARGS += ["--bootstrap", 200, "--memorized_threshold", 0.6, "--over_unlearned_threshold", 0.15]


def test_zero3_two_ranks_give_the_same_reference_and_retrained_figures(model_dir, token_sets, tmp_path):
    # 3 forget + 21 holdout rows over 2 ranks (uneven shards); 21 rows: TPR at 5% FPR is a number.
    forget = write_jsonl(
        tmp_path / "forget.jsonl", [{"id": f"f{i}", "input_ids": s} for i, s in enumerate(token_sets["memorized"])]
    )
    holdout = write_jsonl(
        tmp_path / "holdout.jsonl",
        [{"id": f"h{i}", "input_ids": s} for i, s in enumerate(random_sequences(21, 30, VOCAB, seed=51))],
    )
    reference = save_model(tiny_model("llama", seed=6, vocab_size=VOCAB), tmp_path / "reference")
    retrained = save_model(tiny_model("llama", seed=7, vocab_size=VOCAB), tmp_path / "retrained")
    common = ["--model", model_dir, "--forget", forget, "--holdout", holdout, *ARGS]
    common += ["--reference", reference, "--retrained", retrained]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["audit", *map(str, common), "--out", str(one)]) == 0
    result = deepspeed_run("launch/audit.py", *common, "--out", two, "--deepspeed", REPO / "configs/ds/zero3.json")
    assert result.returncode == 0, tail(result)
    assert "ZeRO-3: rank 0 holds" in result.stdout, tail(result)
    a, b = read_jsonl(one / "audit.jsonl"), read_jsonl(two / "audit.jsonl")
    assert [(r["set"], r["id"]) for r in a] == [(r["set"], r["id"]) for r in b]
    for ra, rb in zip(a, b):
        assert "ref" in ra and list(ra) == list(rb)
        for key in ("loss", "ref", "ref_pct", "min_k++"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["id"], key)
    sa, sb = (json.loads((d / "audit.json").read_text()) for d in (one, two))
    assert sb["world_size"] == 2
    for key in ("mia", "mia_retrained"):
        for score, entry in sa[key].items():
            assert sb[key][score]["auc"] == pytest.approx(entry["auc"]), (key, score)
            assert sb[key][score]["ci95"] == pytest.approx(entry["ci95"]), (key, score)
            assert sb[key][score]["direction"] == entry["direction"]
    for score, leak in sa["privleak"].items():
        assert (leak is None and sb["privleak"][score] is None) or sb["privleak"][score] == pytest.approx(leak)
    assert sb["forget_quality"] == pytest.approx(sa["forget_quality"])
    for score, d in sa["auc_difference"].items():
        other = sb["auc_difference"][score]
        assert other["delta"] == pytest.approx(d["delta"]) and other["ci95"] == pytest.approx(d["ci95"]), score
        assert other["indistinguishable"] == d["indistinguishable"]
    for score, per_fpr in sa["tpr_at_fpr"].items():
        for fpr, entry in per_fpr.items():
            other = sb["tpr_at_fpr"][score][fpr]
            if entry["tpr"] is None:
                assert other == entry
            else:
                assert other["tpr"] == pytest.approx(entry["tpr"]) and other["ci95"] == pytest.approx(entry["ci95"])
    assert sa["tpr_at_fpr"]["ref"]["0.05"]["tpr"] is not None and not math.isnan(sa["tpr_at_fpr"]["ref"]["0.05"]["tpr"])
