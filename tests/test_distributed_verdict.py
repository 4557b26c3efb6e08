"""Calibrated verdicts on random-token data under the real deepspeed launcher (2 ZeRO-3 CPU ranks):
unseen random strings mostly score MA 0, the band keeps them in, and SGA and TAU (full and LoRA)
stop by their stop rule with nothing memorized by the report's own verdicts."""

import json

import numpy as np
import pytest

from ds_unlearn.core.files import read_jsonl

from .launcher import REPO, deepspeed_run, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run(case, out, *extra):
    args = [
        *("--model", case / "model", "--forget", case / "forget.jsonl", "--retain", case / "retain.jsonl"),
        *("--holdout", case / "holdout.jsonl", "--output_dir", out, "--extract_k", 8),
        *("--per_device_train_batch_size", 6, "--score_batch_size", 64, "--save_strategy", "no"),
        *("--save_resumable", "false", "--num_train_epochs", 40, "--seed", 0),
        *("--deepspeed", REPO / "configs" / "ds" / "zero3.json"),
        *extra,
    ]
    result = deepspeed_run("launch/unlearn.py", *args, timeout=900)
    assert result.returncode == 0, tail(result)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sga", ("--learning_rate", "3e-3")),
        ("tau", ("--learning_rate", "3e-3")),
        ("sga", ("--learning_rate", "3e-2", "--lora_r", 8)),
        ("tau", ("--learning_rate", "1e-1", "--lora_r", 8)),
    ],
    ids=["sga", "tau", "sga-lora", "tau-lora"],
)
def test_random_token_unlearning_stops_by_the_rule_inside_the_band(random_case, tmp_path, method, extra):
    report = run(random_case, tmp_path / "run", "--method", method, *extra)
    t = report["thresholds"]
    assert report["settings"]["world_size"] == 2 and report["thresholds_source"] == "holdout"
    # Most unseen strings tie at MA 0: a ">= q95 / <= q05" cut would call them over-unlearned.
    # Mid-rank positions keep MA 0 inside the band, and no MA is over-unlearned at all.
    assert t["rule"] == "holdout" and t["band"]["ma"][0] == 0.0 and t["over_unlearned_ma"] is None
    assert report["before"]["memorized"] == 12
    assert "stop rule holds" in report["stop_reason"], report["stop_reason"]
    assert report["after"]["memorized"] == 0 and report["after"]["over_unlearned"] <= 1
    # The report's verdicts are the per-sequence scores judged at the equivalent MA level.
    after = read_jsonl(tmp_path / "run" / "scores_after.jsonl")
    assert int(np.sum([r["ma"] >= t["memorized_ma"] for r in after])) == 0
