"""Unlearning with LoRA adapters: the base frozen (partitioned under ZeRO-3), only adapters trained.

GA and SGA need nothing special: ``OwnedWeights`` walks the trainable parameters, so snapshots,
best-epoch snapshots and restores cover the adapters alone.

TA/TAU's task vector on adapters. An adapter's delta Delta = s B A (s = alpha / r) is not linear
in (A, B), so the edit is done on the deltas. With theta_base = W0 + Delta_s (the frozen base plus
the adapter at the switch) and theta = W0 + Delta_n (now), the edited model is

    W0 + Delta_s - lambda (Delta_n - Delta_s) = W0 + (1 + lambda) Delta_s - lambda Delta_n      (exact)

per adapted weight (Ilharco et al. 2023 task arithmetic on theta_base + lambda * tau). It never
touches W0: the run keeps a second, frozen adapter ``tv_base`` holding (A_s, B_s), active in
every forward with scale 0, and judging the edit only sets the two adapters' scales to
-lambda s and (1 + lambda) s. The output is one adapter of rank 2r with the same s
(``edited_lora_factors``), so no partitioned base weight is ever gathered or written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ..core import distributed as D
from ..core.adapters import (
    ADAPTER_WEIGHTS,
    add_lora,
    check_adapter_fits,
    check_fits,
    load_adapter,
    lora_config,
    whole_module_targets,
)
from ..core.ds_config import load_ds_config, zero_stage
from ..core.errors import InputError, param
from ..core.files import atomic_directory
from .methods import METHODS

TRAINED = "default"  # peft's name for the adapter get_peft_model / from_pretrained creates
# Module names under which peft keeps an adapter's own tensors, each followed by the adapter's name:
# ``...q_proj.lora_A.default.weight``, ``...embed_tokens.lora_embedding_A.default`` (a ParameterDict
# entry: no ``.weight``), ``...lm_head.modules_to_save.default.weight``.
ADAPTER_MARKERS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
)
TV_BASE = "tv_base"  # TA/TAU: the trained adapter as it was at the switch (theta_base), frozen
# Directories a LoRA run writes under output_dir (TA/TAU: the task vector's ingredients too).
ADAPTER_DIR, TV_BASE_DIR, TV_TRAINED_DIR = "adapter", "tv_base_adapter", "tv_trained_adapter"


def edited_lora_factors(
    a_base: torch.Tensor, b_base: torch.Tensor, a_now: torch.Tensor, b_now: torch.Tensor, coefficient: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A, B) of rank 2r whose product is (1 + lambda) B_s A_s - lambda B_n A_n.

    With the same scaling s, s B A = Delta_s - lambda (Delta_n - Delta_s) exactly: the task-vector
    edit (Ilharco et al. 2023) of two LoRA states (Hu et al. 2021). ``a_*``: (r, in), ``b_*``:
    (out, r), same dtype; returns A (2r, in) = [A_s; A_n] and B (out, 2r) = [(1+lambda) B_s,
    -lambda B_n] in that dtype. Raises ValueError when the shapes disagree."""
    if a_base.shape != a_now.shape or b_base.shape != b_now.shape or a_base.shape[0] != b_base.shape[1]:
        raise ValueError(
            f"adapter states do not match: A {tuple(a_base.shape)} / {tuple(a_now.shape)}, "
            f"B {tuple(b_base.shape)} / {tuple(b_now.shape)}"
        )
    a = torch.cat([a_base, a_now], dim=0)
    b = torch.cat([(1.0 + coefficient) * b_base, -coefficient * b_now], dim=1)
    return a, b


def adapter_of(name: str) -> str | None:
    """The adapter a parameter name belongs to (``default``, ``tv_base``), or None for a base weight."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ADAPTER_MARKERS:
            return parts[i + 1]
    return None


def renamed_adapter(name: str, adapter: str) -> str:
    """``name`` with its adapter component replaced by ``adapter`` (same module, other adapter)."""
    parts = name.split(".")
    i = next(i for i, part in enumerate(parts[:-1]) if part in ADAPTER_MARKERS)
    return ".".join([*parts[: i + 1], adapter, *parts[i + 2 :]])


def new_adapter_config(model_config, config):
    """peft's LoraConfig of a run: --adapter's own, or one from --lora_r and friends."""
    if config.adapter:
        from peft import LoraConfig

        return LoraConfig.from_pretrained(config.adapter)
    return lora_config(model_config, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)


def check_lora(model_config, config) -> None:
    """The run's LoRA settings fit the model (checked on a weightless copy, before loading); an
    ``--adapter`` also has every tensor in the shape this model gives it (one made for another
    base model is one line now)."""
    adapter_config = new_adapter_config(model_config, config)
    check_fits(model_config, adapter_config)
    if config.adapter:
        check_adapter_fits(model_config, adapter_config, config.adapter)
    if config.deepspeed and zero_stage(load_ds_config(config.deepspeed)) == 3:
        # ZeRO-3 loads the base partitioned (empty outside a gather) before the adapter is built, and
        # peft builds these from the base weight's full shape: the adapter would not load or train.
        whole = whole_module_targets(model_config, adapter_config)
        if whole:
            raise InputError(
                f"{param('adapter') if config.adapter else 'lora_target_modules'}: {whole[0]} is an embedding "
                "adapter or a modules_to_save copy, which peft cannot build on ZeRO-3's partitioned weights; "
                "use ZeRO-2 or target linear layers only"
            )


def prepare_model(model, config):
    """The loaded base model with LoRA adapters (``--lora_r``) or ``--adapter``'s, trainable;
    for TA/TAU also the frozen ``tv_base`` adapter. Call before the Trainer is built (DeepSpeed
    then partitions the adapters with the base). InputError when the settings do not fit."""
    if config.adapter:
        model = load_adapter(model, config.adapter, trainable=True)
    else:
        model = add_lora(model, new_adapter_config(model.config, config))
    if METHODS[config.method].task_vector is not None:  # any config with a method name (tests pass a namespace)
        cfg = model.peft_config[TRAINED]
        if cfg.use_dora or cfg.rank_pattern or cfg.alpha_pattern:
            raise InputError("adapter: TA/TAU on adapters needs plain LoRA (no DoRA, no per-layer rank/alpha)")
        if cfg.modules_to_save or getattr(cfg, "trainable_token_indices", None):
            # A full trained copy of a module is not a low-rank delta: the task vector here edits deltas.
            raise InputError("adapter: TA/TAU on adapters cannot edit modules_to_save or trainable tokens (LoRA only)")
        model.add_adapter(TV_BASE, copy.deepcopy(cfg))
        model.base_model.set_adapter([TRAINED, TV_BASE])  # both in every forward; tv_base at scale 0
        for name, param in model.named_parameters():
            param.requires_grad_(adapter_of(name) == TRAINED)
        AdapterEdit(model, 0.0).off()
    return model


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _has_adapter(layer, adapter: str) -> bool:
    # Linear layers keep their factors in lora_A, embeddings in lora_embedding_A (both scaled by
    # layer.scaling[adapter]): an edit that skipped the embeddings would judge tv_base's at full scale.
    return adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {})


class AdapterEdit:
    """Switches a TA/TAU model between the trained adapter (off) and the edited model
    W0 + (1 + lambda) Delta_s - lambda Delta_n (on) by the adapters' scales alone."""

    def __init__(self, model, coefficient: float):
        self.coefficient = coefficient
        self.layers = [m for m in _lora_layers(model) if _has_adapter(m, TV_BASE)]
        # peft's own scale of each layer (alpha / r, alpha / sqrt(r) with rsLoRA, ...), read while
        # the edit is off (prepare_model leaves it so): whatever options set it, the edit scales it.
        self.scaling = [float(m.scaling[TRAINED]) for m in self.layers]
        named = dict(model.named_parameters())
        # The frozen copy of each trained parameter, in OwnedWeights' order (parameters()).
        self.base_params = [
            named[renamed_adapter(name, TV_BASE)] for name, param in model.named_parameters() if param.requires_grad
        ]
        self.active = False

    @staticmethod
    def applies(model) -> bool:
        if not hasattr(model, "peft_config"):  # no peft import for a full fine-tuning run
            return False
        return any(_has_adapter(m, TV_BASE) for m in _lora_layers(model))

    def on(self) -> None:
        for layer, s in zip(self.layers, self.scaling):
            layer.scaling[TRAINED] = -self.coefficient * s
            layer.scaling[TV_BASE] = (1.0 + self.coefficient) * s
        self.active = True

    def off(self) -> None:
        for layer, s in zip(self.layers, self.scaling):
            layer.scaling[TRAINED] = s
            layer.scaling[TV_BASE] = 0.0
        self.active = False

    def set_base(self, weights, base) -> None:
        """theta_base: write the trained adapter's snapshot ``base`` (OwnedWeights format) into
        the frozen copy (collective under ZeRO)."""
        weights.write_into(self.base_params, base)


# -- outputs -------------------------------------------------------------------------------------------
@torch.no_grad()
def gather_adapters(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter's full weights in fp32 on the CPU, by adapter name: exactly the tensors
    peft's ``get_peft_model_state_dict`` saves (LoRA factors of linear and embedding layers,
    ``modules_to_save`` copies, DoRA magnitudes) under its key names (adapter name dropped); the
    frozen base embedding is not repeated (the input checkpoint has it). Collective under ZeRO-3
    (gathers the adapters' tensors only, never the partitioned base)."""
    from peft import get_peft_model_state_dict

    named = [(n, p) for n, p in model.named_parameters() if adapter_of(n) is not None]
    params = [p for _, p in named]
    gathered = None
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        gathered.__enter__()
    try:
        full = {name: param.data.detach().float().cpu().clone() for name, param in named}
    finally:
        if gathered is not None:
            gathered.__exit__(None, None, None)
    return {
        adapter: get_peft_model_state_dict(model, state_dict=full, adapter_name=adapter, save_embedding_layers=False)
        for adapter in model.peft_config
    }


def write_adapter(directory: Path, state: dict[str, torch.Tensor], config) -> None:
    """An adapter directory in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``),
    complete or absent: written under a temporary name and renamed (``files.atomic_directory``), so a
    full disk leaves no adapter that loads as if whole. Raises OSError (ENOSPC named) on a write error."""
    from safetensors.torch import save_file

    config = copy.deepcopy(config)
    config.inference_mode = True
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def edited_alpha(config, scaling: float) -> float:
    """lora_alpha of the rank-2r edited adapter such that peft scales it by ``scaling`` (the trained
    adapter's own scale, as peft computed it): 2 alpha for plain LoRA (alpha / r), and
    ``scaling * sqrt(2r)`` under rsLoRA (alpha / sqrt(r)), whose doubled alpha would scale by
    sqrt(2) too much."""
    if getattr(config, "use_rslora", False):
        return scaling * math.sqrt(2 * config.r)
    if math.isclose(scaling, config.lora_alpha / config.r, rel_tol=1e-12):
        return 2 * config.lora_alpha
    return scaling * 2 * config.r


def edited_adapter(base: dict, trained: dict, config, coefficient: float, scaling: float) -> tuple[dict, object]:
    """The edited model's adapter: rank 2r at the trained adapter's scale ``scaling`` (peft's,
    ``edited_alpha``), factors from ``edited_lora_factors`` per adapted linear or embedding layer
    (an embedding's A is (r, vocab) and B (dim, r): the same concatenation). Raises ValueError
    for a tensor that is not a LoRA factor (prepare_model refuses those for TA/TAU)."""
    state = {}
    for key, value in trained.items():
        if key.endswith((".lora_B.weight", ".lora_embedding_B")):
            continue
        if not key.endswith((".lora_A.weight", ".lora_embedding_A")):
            raise ValueError(f"TA/TAU adapter tensor {key} is not a LoRA factor")
        b_key = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key[: -len("A")] + "B"
        state[key], state[b_key] = edited_lora_factors(base[key], base[b_key], value, trained[b_key], coefficient)
    config = copy.deepcopy(config)
    config.lora_alpha = edited_alpha(config, scaling)
    config.r = 2 * config.r
    return state, config


def save_adapters(model, out: Path, edit: AdapterEdit | None) -> list[str]:
    """Write ``out/adapter`` (the output model's adapter: the trained one, or TA/TAU's edited one
    of rank 2r with ``tv_base_adapter`` and ``tv_trained_adapter`` beside it). Collective.
    Returns the directory names written."""
    states = gather_adapters(model)
    config = model.peft_config[TRAINED]
    if not D.is_main():
        return []
    if edit is not None and edit.active:
        write_adapter(out / TV_BASE_DIR, states[TV_BASE], config)
        write_adapter(out / TV_TRAINED_DIR, states[TRAINED], config)
        scales = set(edit.scaling)
        if len(scales) != 1:  # prepare_model refuses per-layer rank/alpha patterns for TA/TAU
            raise ValueError(f"TA/TAU adapters with {len(scales)} different scales cannot be written as one")
        state, edited_config = edited_adapter(states[TV_BASE], states[TRAINED], config, edit.coefficient, scales.pop())
        write_adapter(out / ADAPTER_DIR, state, edited_config)
        return [ADAPTER_DIR, TV_BASE_DIR, TV_TRAINED_DIR]
    write_adapter(out / ADAPTER_DIR, states[TRAINED], config)
    return [ADAPTER_DIR]


def adapted_weight_names(model) -> list[str]:
    """Checkpoint names (``<module path>.weight``) of the weights the adapters change: every
    LoRA layer's (linear or embedding) and every tensor of a ``modules_to_save`` copy."""
    from peft.utils.other import ModulesToSaveWrapper

    prefix, layers = "base_model.model.", {id(m) for m in _lora_layers(model)}
    names = [f"{name[len(prefix) :]}.weight" for name, module in model.named_modules() if id(module) in layers]
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            names += [f"{name[len(prefix) :]}.{key}" for key in module.original_module.state_dict()]
    return names
