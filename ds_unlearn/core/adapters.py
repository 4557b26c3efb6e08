"""LoRA adapters (peft; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
wrapping a model, loading an adapter directory onto a base model, and merging an adapter into a
copy of a safetensors checkpoint without building the model.

An adapter on a linear layer W (out x in) adds Delta W = s B A with A (r x in), B (out x r) and
s = alpha / r (alpha / sqrt(r) with rsLoRA). peft's directory format: ``adapter_config.json``
(a ``LoraConfig``) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch

from .errors import InputError, param

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Delta W = scaling * B @ A in fp32 (Hu et al. 2021, eq. 3).

    ``a``: (r, in), ``b``: (out, r), any float dtype; returns (out, in) float32, transposed to
    (in, out) when the layer stores its weight that way (``fan_in_fan_out``, GPT-2's Conv1D).
    Raises ValueError when the ranks do not agree."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA factors of shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not multiply")
    delta = scaling * (b.float() @ a.float())
    return delta.T if fan_in_fan_out else delta


def lora_config(model_config, r: int, alpha: float, dropout: float, target_modules):
    """peft's ``LoraConfig`` for a model of ``model_config``: ``target_modules`` None means peft's default for the
    architecture, falling back to every linear layer (but the output head) where peft has none."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if target_modules is None and getattr(model_config, "model_type", None) not in DEFAULTS:
        target_modules = "all-linear"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")


def add_lora(model, config):
    """``get_peft_model(model, config)``: the base frozen, adapters trainable. Raises InputError
    (one line) when the settings do not fit the model (a target module it lacks)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise InputError(f"lora_target_modules: {_first_line(err)}") from None


def check_fits(model_config, config) -> None:
    """Before any weight loads: put the LoRA ``config`` on a weightless copy of the model
    (meta device) so a target module it lacks is one line now, not after loading 70B weights.
    InputError as ``add_lora``'s."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:  # custom code: get_peft_model checks it after loading instead
        return
    with torch.device("meta"):
        add_lora(model_class(model_config), copy.deepcopy(config))


def whole_module_targets(model_config, config) -> list[str]:
    """The modules a LoRA ``config`` would build from a base weight's full shape rather than wrap
    as a linear layer: embeddings it targets (``lora_embedding_A/B``) and ``modules_to_save`` copies.
    Found on a weightless copy (as ``check_fits``); [] for custom-code models."""
    from peft.tuners.lora import Embedding
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        return []
    with torch.device("meta"):
        model = add_lora(model_class(model_config), copy.deepcopy(config))
    return [name for name, m in model.named_modules() if isinstance(m, (Embedding, ModulesToSaveWrapper))]


def check_adapter_fits(model_config, config, adapter_dir: str | Path) -> None:
    """Before any weight loads: every tensor of the adapter in ``adapter_dir`` is one this model
    would have, in the same shape (on a weightless copy, as ``check_fits``). InputError naming
    the first that is missing or misshapen: an adapter made for another base model."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:  # custom code: PeftModel.from_pretrained checks it after loading instead
        return
    if not weights.is_file():
        raise InputError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}", field="adapter")
    with torch.device("meta"):
        model = add_lora(model_class(model_config), copy.deepcopy(config))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    with safe_open(str(weights), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in saved.items():
        if key not in expected and ".base_layer." not in key and not key.endswith("embed_tokens.weight"):
            raise InputError(f"{adapter_dir} was made for another model: this one has no {key}", field="adapter")
        if key in expected and expected[key] != shape:
            raise InputError(
                f"{param('adapter')}: {adapter_dir} was made for another model: {key} is {list(shape)} there, "
                f"{list(expected[key])} here"
            )
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise InputError(f"{adapter_dir} lacks {missing[0]}, which its config asks for on this model", field="adapter")


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """``PeftModel.from_pretrained(model, adapter_dir)``; InputError (one line) when the adapter
    does not fit the model or is not a LoRA adapter."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        raise InputError(f"cannot load {adapter_dir} on this model: {_first_line(err)}", field="adapter") from None


def check_adapter_dir(adapter_dir: str | Path) -> dict:
    """The adapter's config as a dict; InputError unless it is a peft LoRA adapter directory."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"{adapter_dir} is not a peft adapter directory (no {ADAPTER_CONFIG})", field="adapter")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise InputError(
            f"{adapter_dir} is a {config.get('peft_type')} adapter; only LoRA is supported", field="adapter"
        )
    return config


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- merging into a checkpoint on disk --------------------------------------------------------------
def checkpoint_shards(model_dir: str | Path) -> list[str]:
    """The safetensors files of a local checkpoint (one file, or the shards its index lists);
    InputError when it has none (a Hub id, or .bin weights): merging reads them one by one."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise InputError(f"merge_adapter: {model_dir} is not a local safetensors checkpoint; merge it with peft instead")


def check_merge_targets(model_dir: str | Path, weight_names: list[str]) -> None:
    """Before training: every weight the adapters change is in the checkpoint's safetensors (so
    ``merge_into_checkpoint`` cannot fail after the run). InputError naming the first missing."""
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in checkpoint_shards(model_dir):
        with safe_open(str(Path(model_dir) / shard), framework="pt") as f:
            keys.update(f.keys())
    missing = [name for name in weight_names if name not in keys]
    if missing:
        raise InputError(f"merge_adapter: {model_dir} has no weight {missing[0]} (its adapter could not be merged)")


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Delta W per base weight name (``<module path>.weight``), fp32, from a LoRA adapter
    directory: linear layers' (out, in) and embeddings' (vocab, dim, from ``lora_embedding_A``
    (r, vocab) and ``lora_embedding_B`` (dim, r)). Raises InputError for adapter features a plain
    sum cannot represent (DoRA, per-layer rank or alpha patterns). ``modules_to_save`` copies are
    not deltas: ``adapter_replacements`` has them."""
    from safetensors.torch import load_file

    config = check_adapter_dir(adapter_dir)
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InputError("merge_adapter: DoRA and per-layer rank/alpha patterns are not supported")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    deltas = {}
    for key, a in state.items():
        if key.endswith((".lora_B.weight", ".lora_embedding_B")) or _replacement_name(key, config):
            continue
        if key.startswith(PREFIX) and key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = state[f"{PREFIX}{module}.lora_B.weight"]
            deltas[f"{module}.weight"] = lora_delta(a, b, scaling, bool(config.get("fan_in_fan_out")))
        elif key.startswith(PREFIX) and key.endswith(".lora_embedding_A"):
            module = key[len(PREFIX) : -len(".lora_embedding_A")]
            b = state[f"{PREFIX}{module}.lora_embedding_B"]
            deltas[f"{module}.weight"] = lora_delta(a, b, scaling, fan_in_fan_out=True)  # (vocab, dim)
        else:
            raise InputError(f"merge_adapter: adapter tensor {key} is not a LoRA factor or a module to save")
    return deltas


def _replacement_name(key: str, config: dict) -> str | None:
    """The checkpoint name a ``modules_to_save`` tensor of the adapter replaces, else None."""
    if not key.startswith(PREFIX) or ".lora_" in key:
        return None
    name = key[len(PREFIX) :]
    module = name.rsplit(".", 1)[0]
    saved = config.get("modules_to_save") or []
    return name if any(module == m or module.endswith(f".{m}") for m in saved) else None


def adapter_replacements(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` tensors (whole trained copies, e.g. an ``lm_head``) by the
    checkpoint name each replaces."""
    from safetensors.torch import load_file

    config = check_adapter_dir(adapter_dir)
    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    return {name: v for k, v in state.items() if (name := _replacement_name(k, config))}


def merge_into_checkpoint(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> None:
    """Write ``out_dir``: a copy of the checkpoint ``model_dir`` with every adapted weight
    replaced by W + Delta W (computed in fp32, stored in the weight's own dtype). One shard in
    memory at a time; the model is never built, so it works the same on any number of ranks
    (call it on one). Raises InputError when the adapter names a weight the checkpoint lacks."""
    from safetensors.torch import load_file, save_file

    from .files import atomic_directory

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    deltas, replacements = adapter_deltas(adapter_dir), adapter_replacements(adapter_dir)
    with atomic_directory(out_dir) as tmp:  # complete or absent: a full disk leaves no half checkpoint
        for item in model_dir.iterdir():  # config, generation config, tokenizer, shard index
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        for shard in checkpoint_shards(model_dir):
            tensors = load_file(str(model_dir / shard))
            for name in set(replacements) & set(tensors):
                tensors[name] = replacements.pop(name).to(tensors[name].dtype)
            for name in set(deltas) & set(tensors):
                weight = tensors[name]
                tensors[name] = (weight.float() + deltas.pop(name)).to(weight.dtype)
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        if deltas or replacements:
            missing = sorted(deltas) or sorted(replacements)
            raise InputError(f"merge_adapter: the checkpoint has no weight {missing[0]} the adapter changes")
