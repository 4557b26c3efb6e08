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
from pathlib import Path

import torch

from ..core import distributed as D
from ..core.adapters import ADAPTER_WEIGHTS, add_lora, check_fits, load_adapter, lora_config

TRAINED = "default"  # peft's name for the adapter get_peft_model / from_pretrained creates
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


def new_adapter_config(model_config, config):
    """peft's LoraConfig of a run: --adapter's own, or one from --lora_r and friends."""
    if config.adapter:
        from peft import LoraConfig

        return LoraConfig.from_pretrained(config.adapter)
    return lora_config(model_config, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)


def check_lora(model_config, config) -> None:
    """The run's LoRA settings fit the model (checked on a weightless copy, before loading)."""
    check_fits(model_config, new_adapter_config(model_config, config))


def prepare_model(model, config):
    """The loaded base model with LoRA adapters (``--lora_r``) or ``--adapter``'s, trainable;
    for TA/TAU also the frozen ``tv_base`` adapter. Call before the Trainer is built (DeepSpeed
    then partitions the adapters with the base). InputError when the settings do not fit."""
    if config.adapter:
        model = load_adapter(model, config.adapter, trainable=True)
    else:
        model = add_lora(model, new_adapter_config(model.config, config))
    if config.method in ("ta", "tau"):
        from ..core.errors import InputError

        cfg = model.peft_config[TRAINED]
        if cfg.use_dora or cfg.rank_pattern or cfg.alpha_pattern:
            raise InputError("adapter: TA/TAU on adapters needs plain LoRA (no DoRA, no per-layer rank/alpha)")
        model.add_adapter(TV_BASE, copy.deepcopy(cfg))
        model.base_model.set_adapter([TRAINED, TV_BASE])  # both in every forward; tv_base at scale 0
        for name, param in model.named_parameters():
            param.requires_grad_(f".{TRAINED}." in name)
        AdapterEdit(model, 0.0).off()
    return model


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class AdapterEdit:
    """Switches a TA/TAU model between the trained adapter (off) and the edited model
    W0 + (1 + lambda) Delta_s - lambda Delta_n (on) by the adapters' scales alone."""

    def __init__(self, model, coefficient: float):
        self.coefficient = coefficient
        self.layers = [m for m in _lora_layers(model) if TV_BASE in m.lora_A]
        self.scaling = [m.lora_alpha[TRAINED] / m.r[TRAINED] for m in self.layers]
        if any(m.use_rslora.get(TRAINED, False) for m in self.layers):
            self.scaling = [m.lora_alpha[TRAINED] / m.r[TRAINED] ** 0.5 for m in self.layers]
        named = dict(model.named_parameters())
        # The frozen copy of each trained parameter, in OwnedWeights' order (parameters()).
        self.base_params = [
            named[name.replace(f".{TRAINED}.", f".{TV_BASE}.")]
            for name, param in model.named_parameters()
            if param.requires_grad
        ]
        self.active = False

    @staticmethod
    def applies(model) -> bool:
        if not hasattr(model, "peft_config"):  # no peft import for a full fine-tuning run
            return False
        return any(TV_BASE in m.lora_A for m in _lora_layers(model))

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
    """Every adapter's full weights in fp32 on the CPU, by adapter name, under peft's saved key
    names (adapter name dropped). Collective under ZeRO-3 (gathers the adapters only)."""
    named = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    params = [p for _, p in named]
    gathered = None
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        gathered.__enter__()
    try:
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in named:
            adapter = name.split(".lora_A." if ".lora_A." in name else ".lora_B.")[1].split(".")[0]
            key = name.replace(f".{adapter}.", ".", 1)
            states.setdefault(adapter, {})[key] = param.data.detach().float().cpu().clone()
        return states
    finally:
        if gathered is not None:
            gathered.__exit__(None, None, None)


def write_adapter(directory: Path, state: dict[str, torch.Tensor], config) -> None:
    """An adapter directory in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"}
    )


def edited_adapter(base: dict, trained: dict, config, coefficient: float) -> tuple[dict, object]:
    """The edited model's adapter: rank 2r, alpha 2 alpha (the same scale), factors from
    ``edited_lora_factors`` per adapted layer."""
    state = {}
    for key in (k for k in trained if k.endswith(".lora_A.weight")):
        b_key = key.replace(".lora_A.", ".lora_B.")
        state[key], state[b_key] = edited_lora_factors(
            base[key], base[b_key], trained[key], trained[b_key], coefficient
        )
    config = copy.deepcopy(config)
    config.r, config.lora_alpha = 2 * config.r, 2 * config.lora_alpha
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
        state, edited_config = edited_adapter(states[TV_BASE], states[TRAINED], config, edit.coefficient)
        write_adapter(out / ADAPTER_DIR, state, edited_config)
        return [ADAPTER_DIR, TV_BASE_DIR, TV_TRAINED_DIR]
    write_adapter(out / ADAPTER_DIR, states[TRAINED], config)
    return [ADAPTER_DIR]


def adapted_weight_names(model) -> list[str]:
    """Checkpoint names (``<module path>.weight``) of the weights the adapters change."""
    prefix, layers = "base_model.model.", {id(m) for m in _lora_layers(model)}
    return [f"{name[len(prefix) :]}.weight" for name, module in model.named_modules() if id(module) in layers]
