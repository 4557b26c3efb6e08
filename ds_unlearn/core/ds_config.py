"""DeepSpeed JSON configs: read them, and resolve "auto" for runs without a Trainer.

The shipped configs put "auto" on everything ``TrainingArguments`` owns (batch sizes, lr,
precision), so each value is set in one place. The Trainer resolves those itself; standalone
scoring, which has no optimizer, resolves them here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .errors import InputError


def load_ds_config(path: str | Path | dict) -> dict:
    if isinstance(path, dict):
        return copy.deepcopy(path)
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"no such file {path}", field="deepspeed") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err})", field="deepspeed") from None


def zero_stage(config: dict | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def _drop_autos(node):
    if isinstance(node, dict):
        return {k: _drop_autos(v) for k, v in node.items() if v != "auto"}
    return node


def resolve_for_inference(config: dict, hidden_size: int, world_size: int, dtype: torch.dtype) -> dict:
    """A copy of ``config`` DeepSpeed accepts for forward-only use: no optimizer or scheduler,
    precision from the model's dtype, ZeRO-3 bucket sizes from the hidden size (the values the
    transformers integration would pick), and any other "auto" left to DeepSpeed's default."""
    cfg = copy.deepcopy(config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = world_size
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == torch.float16}
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    zero = cfg.get("zero_optimization", {})
    defaults = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return _drop_autos(cfg)
