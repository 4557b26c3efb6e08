"""Rank helpers over torch.distributed, and the CPU/gloo setup DeepSpeed and accelerate need.

Everything degrades to a single process when no process group exists, so the same code path
serves ``python script.py`` and ``deepspeed --num_gpus N script.py``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_launcher() -> bool:
    """True inside a process started by ``deepspeed``/``torchrun`` (they set these variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> None:
    """Join the process group the launcher set up (no-op for a plain single process)."""
    if not launched_by_launcher() or (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def configure_process_for_trainer(settings: dict) -> None:
    """Process setup a ``TrainingArguments``-based config needs, run by the command entry just
    before the config is built: under DeepSpeed on CPU, accelerate's gloo state, and
    ``accelerator_config`` pointing the Trainer at it. Changes ``settings`` in place."""
    if settings.get("deepspeed") and prepare_accelerate_for_deepspeed():
        settings["accelerator_config"] = {"use_configured_state": True}


def uses_configured_state() -> bool:
    """True when the entry prepared accelerate's state for DeepSpeed on CPU (see below)."""
    return not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def prepare_accelerate_for_deepspeed() -> bool:
    """Make ``transformers.Trainer`` see every rank when DeepSpeed runs on CPU; True if it did.

    accelerate only recognises DeepSpeed on accelerators; without this the Trainer believes the
    world size is 1 (REFERENCE §4). Must run before ``TrainingArguments`` is built. A plain
    process (no launcher) becomes a world of one.
    """
    if torch.cuda.is_available():
        return False
    if not launched_by_launcher():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(count: int) -> list[int]:
    """This rank's rows of ``count``: contiguous, equal-sized shards (the last ones padded with
    repeats of the final row), so every rank runs the same number of batches and forward calls
    (ZeRO-3's parameter gathers are collective). Pair with ``gather_shards``."""
    per_rank = -(-count // world_size())
    start = rank() * per_rank
    return [min(start + j, count - 1) for j in range(per_rank)]


def gather_shards(local: list[Any], count: int) -> list[Any]:
    """Every rank's ``shard_indices`` results, concatenated in row order on every rank: position
    i < count of the concatenation is row i itself; the padding repeats all come after."""
    return [row for shard in all_gather_objects(local) for row in shard][:count]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def finalize() -> None:
    """Leave the process group cleanly: ZeRO-3 ranks abort at exit without this (REFERENCE §4)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
