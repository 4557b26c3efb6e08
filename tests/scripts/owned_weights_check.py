"""Drive ``OwnedWeights`` on a real DeepSpeed engine and report what the optimizer's fp32 masters
hold afterwards (run by tests/test_weights.py under the ``deepspeed`` launcher, 2 CPU ranks).

    deepspeed --num_accelerators 2 tests/scripts/owned_weights_check.py STAGE PRECISION OUT.json
"""

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from ds_unlearn.commands import process
from ds_unlearn.core import distributed as D
from ds_unlearn.core.toy import random_sequences, tiny_model
from ds_unlearn.unlearn.weights import OwnedWeights

LAMBDA = 1.5


def full_masters(params) -> list[torch.Tensor]:
    # Collective under ZeRO: every rank assembles every parameter's fp32 master.
    return [safe_get_full_fp32_param(p).detach().float().cpu().clone() for p in params]


def working_copy(params) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.data.detach().float().cpu().clone() for p in params]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    stage, precision, out = int(args[0]), args[1], args[2]
    process.init_distributed()
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
        # Small threshold: norms stay whole on every rank ("persistent"), matrices are partitioned.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 64},
        "bf16": {"enabled": precision == "bf16"},
    }
    model = tiny_model("llama", seed=0, vocab_size=64)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = torch.tensor(random_sequences(2, 12, 64, seed=D.rank()))

    def step():
        loss = engine(input_ids=data, labels=data).loss
        engine.backward(loss)
        engine.step()

    params = [p for p in engine.module.parameters() if p.requires_grad]
    for _ in range(2):
        step()
    weights = OwnedWeights(engine.module)
    base = weights.snapshot()
    base_full = full_masters(params)
    for _ in range(3):
        step()
    theta_full = full_masters(params)
    expected = [b - LAMBDA * (t - b) for b, t in zip(base_full, theta_full)]
    weights.apply_negated_task_vector(base, LAMBDA)
    edited = full_masters(params)
    working = working_copy(params)
    dtype = params[0].dtype
    result = {
        "kind": weights.kind,
        "dtype": str(dtype),
        "moved": max_diff(theta_full, base_full),
        "masters_vs_formula": max_diff(edited, expected),
        "working_vs_rounded_masters": max_diff(working, [e.to(dtype).float() for e in expected]),
    }
    # The edit survives an optimizer step at learning rate 0: it lives in the masters.
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    step()
    result["after_lr0_step"] = max_diff(full_masters(params), expected)
    # Snapshot / restore round trip.
    saved = weights.snapshot()
    weights.apply_negated_task_vector(base, 3.0)
    weights.write(saved)
    result["restore"] = max_diff(full_masters(params), expected)
    result["restore_working"] = max_diff(working_copy(params), [e.to(dtype).float() for e in expected])
    result["all_finite"] = weights.all_finite()
    if D.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    process.finalize()


if __name__ == "__main__":
    main()
