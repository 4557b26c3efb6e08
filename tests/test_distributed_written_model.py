"""Issue 26 on 2 CPU ranks (real deepspeed launcher): the guard under ZeRO-3, and a checkpoint
saved under one ZeRO stage refused in one line when resumed under another."""

import json

import pytest

from .launcher import deepspeed_run, tail
from .test_distributed_unlearn import ds_args, run_ok

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero2_checkpoint_resumed_under_zero3_is_one_line(unlearn_case, tmp_path):
    out = tmp_path / "run"
    first = ("--method", "ga", "--learning_rate", "1e-7", "--num_train_epochs", 1, "--audit", "none")
    run_ok(*ds_args(unlearn_case, out, "zero2", *first))
    report = json.loads((out / "report.json").read_text())
    assert report["guard"]["ok"] and report["guard"]["checked"] == ["model"], report["guard"]  # on 2 ranks
    checkpoint = next(out.glob("checkpoint-*"))
    resume = ("--num_train_epochs", 2, "--resume_from_checkpoint", checkpoint)
    result = deepspeed_run("launch/unlearn.py", *ds_args(unlearn_case, out, "zero3", *first[:4], *resume), timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and "Traceback" not in result.stderr, tail(result)
    assert errors and all("saved with ZeRO stage 2 and this run has ZeRO stage 3" in e for e in errors), tail(result)
