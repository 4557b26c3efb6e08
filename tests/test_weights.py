"""OwnedWeights: TA/TAU edits, snapshots and restores land in the optimizer's fp32 masters and
the working copy alike (ZeRO-2 and ZeRO-3 with bf16 on 2 CPU ranks), and plain parameters
without DeepSpeed (the CPU twin, one process)."""

import json

import pytest
import torch

from ds_unlearn.core.toy import tiny_model
from ds_unlearn.unlearn.weights import OwnedWeights

from .launcher import deepspeed_run, tail


def test_plain_parameters_follow_the_formula_exactly():
    model = tiny_model("llama", seed=0, vocab_size=64)
    weights = OwnedWeights(model)
    assert weights.kind == "plain"
    base = weights.snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theta = [p.detach().clone() for p in model.parameters()]
    weights.apply_negated_task_vector(base, 2.0)
    for p, b, t in zip(model.parameters(), base, theta):
        torch.testing.assert_close(p.data, b - 2.0 * (t - b), rtol=0, atol=1e-6)
    saved = weights.snapshot()
    weights.apply_negated_task_vector(base, 5.0)
    weights.write(saved)
    assert all(torch.equal(p.data, s) for p, s in zip(model.parameters(), saved))
    assert weights.all_finite()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    assert not weights.all_finite()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_edits_reach_the_fp32_masters_under_zero_with_bf16(stage, tmp_path):
    out = tmp_path / "result.json"
    result = deepspeed_run("tests/scripts/owned_weights_check.py", stage, "bf16", out, timeout=420)
    assert result.returncode == 0, tail(result)
    r = json.loads(out.read_text())
    assert r["kind"] == ("zero3" if stage == 3 else "fragments") and r["dtype"] == "torch.bfloat16"
    assert r["moved"] > 1e-3  # training really changed the masters between the snapshots
    # theta_base - lambda (theta - theta_base), computed independently from the fp32 masters.
    assert r["masters_vs_formula"] < 1e-6, r
    assert r["working_vs_rounded_masters"] == 0.0, r  # the bf16 working copy is the rounded master
    assert r["after_lr0_step"] < 1e-6, r  # the next optimizer step keeps the edit
    assert r["restore"] < 1e-6 and r["restore_working"] == 0.0, r
    assert r["all_finite"] is True
