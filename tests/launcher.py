"""Run a script under the real ``deepspeed`` launcher with CPU ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def deepspeed_run(script, *args, ranks=2, timeout=600, cwd=None):
    """``deepspeed --num_accelerators N script args``; returns the CompletedProcess."""
    cmd = [
        DEEPSPEED,
        "--num_accelerators",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(REPO / script),
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=launcher_env(), cwd=cwd)


def tail(result, lines=40) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])
