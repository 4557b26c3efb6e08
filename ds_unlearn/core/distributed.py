"""Rank helpers over torch.distributed, and the CPU/gloo setup DeepSpeed and accelerate need.

Everything degrades to a single process when no process group exists, so the same code path
serves ``python script.py`` and ``deepspeed --num_gpus N script.py``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
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


DEFAULT_TIMEOUT_S = 300  # a collective that waits longer than this ends the job


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group the launcher set up (no-op for a plain single process).

    Every collective gets a finite ``timeout_s`` (seconds): a rank killed by the OS cannot leave
    the others waiting forever; they raise, print and exit non-zero."""
    if not launched_by_launcher() or (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend(), timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def report_error(line: str) -> None:
    """One line to stderr; under a launcher, ranks other than 0 prefix theirs with the rank so a
    failure on one rank names where it happened."""
    prefix = f"[rank {rank_from_env()}] " if launched_by_launcher() and rank_from_env() != 0 else ""
    print(prefix + line, file=sys.stderr, flush=True)


def report_note(line: str) -> None:
    """One informational line to stderr, from rank 0 only: every rank reads the same inputs, so
    the others would print it again (errors, by contrast, print on every rank: report_error)."""
    if rank_from_env() == 0:
        print(line, file=sys.stderr, flush=True)


def report_traceback() -> None:
    """The current exception's traceback, every line prefixed with this rank."""
    tag = f"[rank {rank_from_env()}] "
    text = "".join(traceback.format_exc())
    print("".join(tag + line + "\n" for line in text.rstrip().splitlines()), file=sys.stderr, flush=True)


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (valid before the group exists)."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    """How many ranks the launcher started (1 outside a launcher; valid before the group exists)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_launcher() else 1


def abandon() -> None:
    """Leave the process group on a failure path: no barrier, no collective of any kind."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already broken: nothing left to release
            pass


def shared_memory_buffer() -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for
    this rank: /dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank_from_env()}"


def release_shared_memory() -> None:
    """Unlink this rank's CPU all-reduce buffer (~70 MB): DeepSpeed never does (shm.cpp defines
    ``shared_close`` but nothing calls it), so without this it stays in /dev/shm until reboot, one
    per rank per run. Called by ``finalize`` after the last collective and on a failure path before
    ``os._exit``. Ranks that mapped it keep their mappings; nothing is waited on. Best effort."""
    try:
        shared_memory_buffer().unlink(missing_ok=True)
    except OSError:
        pass


def start_launcher_watchdog(interval_s: float = 1.0) -> None:
    """Under a launcher, end this rank within seconds of its launcher being gone.

    ``deepspeed`` starts ``deepspeed.launcher.launch`` (our parent), which starts the ranks; a
    SIGTERM/SIGINT to the ``deepspeed`` process alone (``timeout``, ``kill PID``, a scheduler)
    ends it at once and would leave the ranks running and writing. A daemon thread watches the
    parent and its parent: when either is gone (we, or our parent, got re-parented), the rank
    prints one line and exits non-zero without writing anything further. Linux only; set
    DS_UNLEARN_NO_WATCHDOG=1 to turn it off."""
    if not launched_by_launcher() or os.environ.get("DS_UNLEARN_NO_WATCHDOG") == "1":
        return
    parent = os.getppid()
    grandparent = _parent_of(parent)
    if grandparent is None:  # no /proc: nothing to watch
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent or _parent_of(parent) != grandparent:
                report_error("the launcher is gone (its process ended); stopping this rank")
                release_shared_memory()
                os._exit(1)

    threading.Thread(target=watch, name="ds_unlearn-launcher-watchdog", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    # Fields after the parenthesised command name: state, ppid, ...
    return int(stat.rsplit(")", 1)[1].split()[1])


def configure_process_for_trainer(settings: dict) -> None:
    """Process setup a ``TrainingArguments``-based config needs, run by the command entry just
    before the config is built: under DeepSpeed on CPU, accelerate's gloo state, and
    ``accelerator_config`` pointing the Trainer at it. Changes ``settings`` in place."""
    if isinstance(settings.get("deepspeed"), str):
        from .ds_config import load_ds_config

        load_ds_config(settings["deepspeed"])  # bad input changes nothing in the process
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
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", **{OWN_WORLD: "1"})
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


def finalize() -> None:
    """Leave the process group cleanly on the success path only: ZeRO-3 ranks abort at exit
    without this (REFERENCE §4). A failure path calls ``abandon`` instead (no barrier)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        release_shared_memory()  # every rank opened its peers' buffers at initialization


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
