"""The real deepspeed launcher, 2 CPU ranks, ZeRO-3: the same audit.jsonl as one process."""

import json
import math

import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl

from .conftest import write_jsonl
from .launcher import REPO, deepspeed_run, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--prefix_length", 8, "--suffix_length", 16, "--extract_k", 8, "--el_n", 5, "--top_p", 0.9, "--top_k", 30]
ARGS += ["--batch_size", 2, "--bootstrap", 200]
ARGS += ["--memorized_threshold", 0.6, "--over_unlearned_threshold", 0.15]  # 3 holdout rows calibrate none


def test_zero3_two_ranks_give_the_same_audit(model_dir, token_sets, tmp_path):
    # 6 forget + 3 holdout rows over 2 ranks: uneven shards, different continuation work per rank.
    forget = write_jsonl(
        tmp_path / "forget.jsonl",
        [{"id": f"{n}-{i}", "input_ids": s} for n in ("memorized", "partial") for i, s in enumerate(token_sets[n])],
    )
    holdout = write_jsonl(
        tmp_path / "holdout.jsonl", [{"id": f"unseen-{i}", "input_ids": s} for i, s in enumerate(token_sets["unseen"])]
    )
    common = ["--model", model_dir, "--forget", forget, "--holdout", holdout, *ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["audit", *map(str, common), "--out", str(one)]) == 0
    result = deepspeed_run("launch/audit.py", *common, "--out", two, "--deepspeed", REPO / "configs/ds/zero3.json")
    assert result.returncode == 0, tail(result)
    assert "ZeRO-3: rank 0 holds" in result.stdout, tail(result)
    a, b = read_jsonl(one / "audit.jsonl"), read_jsonl(two / "audit.jsonl")
    assert [(r["set"], r["id"]) for r in a] == [(r["set"], r["id"]) for r in b]
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float) and math.isfinite(va):
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-5), (ra["id"], key)
            else:
                assert vb == va, (ra["id"], key)
    sa, sb = (json.loads((d / "audit.json").read_text()) for d in (one, two))
    assert sb["world_size"] == 2 and sa["world_size"] == 1
    for score, entry in sa["mia"].items():
        assert sb["mia"][score]["auc"] == pytest.approx(entry["auc"])
        assert sb["mia"][score]["ci95"] == pytest.approx(entry["ci95"])
    assert sa["forget"]["verdicts"] == sb["forget"]["verdicts"]
