"""Process setup of the command entry (``cli.main``, ``launch/``, bench and test scripts): join
the launcher's process group with a finite timeout, prepare accelerate for DeepSpeed on CPU,
watch the launcher, report a failing rank, and leave the group (cleanly on success, at once on
failure). Library code never calls these; what it calls on every rank is ``core.distributed``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.distributed import OWN_WORLD, backend, launched_by_launcher, rank_from_env

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
    write_stderr(prefix + line + "\n")


def write_stderr(text: str) -> None:
    """``text`` to stderr in one write. The ranks share the launcher's stderr: ``print`` writes the
    line and its newline separately, so two ranks failing together could run into one line
    (seen in CI). One write of under PIPE_BUF (4096) bytes to a pipe is never interleaved."""
    sys.stderr.write(text)
    sys.stderr.flush()


def report_traceback() -> None:
    """The current exception's traceback, every line prefixed with this rank."""
    tag = f"[rank {rank_from_env()}] "
    text = "".join(traceback.format_exc())
    write_stderr("".join(tag + line + "\n" for line in text.rstrip().splitlines()))


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
        from ..core.ds_config import load_ds_config

        load_ds_config(settings["deepspeed"])  # bad input changes nothing in the process
    if settings.get("deepspeed") and prepare_accelerate_for_deepspeed():
        settings["accelerator_config"] = {"use_configured_state": True}


def prepare_accelerate_for_deepspeed() -> bool:
    """Make ``transformers.Trainer`` see every rank when DeepSpeed runs on CPU; True if it did.

    accelerate only recognises DeepSpeed on accelerators; without this the Trainer believes the
    world size is 1. Must run before ``TrainingArguments`` is built. A plain
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


def finalize() -> None:
    """Leave the process group cleanly on the success path only: a ZeRO-3 rank's C++ teardown
    aborts at exit (code 250) unless the job ends with a barrier. A failure path calls
    ``abandon`` instead (no barrier)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        release_shared_memory()  # every rank opened its peers' buffers at initialization
