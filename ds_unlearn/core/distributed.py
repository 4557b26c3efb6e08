"""What library code calls on every rank: rank and world-size queries, collectives (gather,
any-rank, barrier, shards) and the ZeRO-3 gather for inference.

Everything degrades to a single process when no process group exists, so the same code path
serves ``python script.py`` and ``deepspeed --num_gpus N script.py``. Setting the process up
(joining the group, accelerate on CPU, the launcher watchdog, leaving) belongs to the command
entry: ``ds_unlearn.commands.process``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


OWN_WORLD = "DS_UNLEARN_OWN_WORLD"  # set when this package made a plain process a world of one


def launched_by_launcher() -> bool:
    """True inside a process started by ``deepspeed``/``torchrun`` (they set these variables),
    not when ``prepare_accelerate_for_deepspeed`` set them for a plain single process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ.get(OWN_WORLD) != "1"


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def report_note(line: str) -> None:
    """One informational line to stderr, from rank 0 only: every rank reads the same inputs, so
    the others would print it again (errors, by contrast, print on every rank:
    ``commands.process.report_error``)."""
    if rank_from_env() == 0:
        print(line, file=sys.stderr, flush=True)


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (valid before the group exists)."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    """How many ranks the launcher started (1 outside a launcher; valid before the group exists)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_launcher() else 1


def uses_configured_state() -> bool:
    """True when the entry prepared accelerate's state for DeepSpeed on CPU
    (``commands.process.prepare_accelerate_for_deepspeed``)."""
    return not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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


# -- ZeRO-3: gather the whole model once for a run of forwards -------------------------------------
def zero3_parameters(model) -> list:
    """The parameters ZeRO-3 partitioned (they carry ``ds_id``); empty for any other model."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def full_model_fits(params, free_bytes: int | None = None, share: float = 0.25) -> bool:
    """True when the full (gathered) parameters take at most ``share`` of the free memory of their
    device (CUDA: free device memory; CPU: the host's MemAvailable)."""
    if not params:
        return True
    full = sum(int(p.ds_numel) * p.element_size() for p in params)
    return full <= share * (free_memory_bytes(params[0].device) if free_bytes is None else free_bytes)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the host's MemAvailable for CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc: assume a modest 4 GiB


@contextmanager
def gathered_for_inference(model, gather: bool | None = None) -> Iterator[bool]:
    """Under ZeRO-3, gather every parameter once for the block (``deepspeed.zero.GatheredParameters``)
    and switch off DeepSpeed's per-module fetch/release hooks meanwhile, so forwards inside are
    local and need no lockstep; yields True then. ``gather`` None decides by ``full_model_fits`` (all
    ranks must agree, so they vote); False, or a model that is not ZeRO-3, yields False and changes
    nothing (every forward then gathers its layers collectively). A collective: every rank enters."""
    params = zero3_parameters(model)
    if not params:
        yield False
        return
    if gather is None:
        gather = all(all_gather_objects(full_model_fits(params)))
    if not gather:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params), _without_deepspeed_hooks(model):
        yield True


def _hook_origin(hook) -> str:
    hook = getattr(hook, "func", hook)  # functools.partial
    return getattr(hook, "__module__", "") or ""


@contextmanager
def _without_deepspeed_hooks(model) -> Iterator[None]:
    # The ZeRO-3 forward hooks would release (re-partition) the gathered parameters after each
    # module and all-gather them again on the next forward; removing them for the block is what
    # deepspeed.runtime.zero.unwrap_model_for_generation does, which needs the engine we lack here.
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            ours = {k: h for k, h in hooks.items() if _hook_origin(h).startswith("deepspeed")}
            if ours:
                saved.append((hooks, dict(hooks)))
                for k in ours:
                    del hooks[k]
    try:
        yield
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)
