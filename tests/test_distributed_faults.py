"""Faults under the real ``deepspeed`` launcher on 2 CPU ranks (ZeRO-3): a failing rank, a killed
rank and a killed launcher each end the whole job, non-zero, within 60 s, loudly; and the runs
that used to die in the weight snapshot (SGA with score_refresh=step, TAU) finish."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ds_unlearn.core.files import read_jsonl

from .conftest import unlearn_args
from .launcher import DEEPSPEED, REPO, free_port, launcher_env, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(case, out, *extra, port=None):
    args = [*unlearn_args(case, out, "--per_device_train_batch_size", 2, *extra)]
    args += ["--deepspeed", REPO / "configs" / "ds" / "zero3.json"]
    port = port or free_port()
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(port), str(REPO / "launch/unlearn.py")]
    return subprocess.Popen(
        [*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launcher_env()
    )


def wait_for(path: Path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


def rank_pids(out: Path) -> dict[int, int]:
    """The rank processes of the job writing to ``out``: {local rank: pid}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if str(out) in args and any(a.endswith("launch/unlearn.py") for a in args):
            rank = next((a.split("=", 1)[1] for a in args if a.startswith("--local_rank=")), None)
            if rank is not None:
                found[int(rank)] = int(entry.name)
    return found


@pytest.mark.parametrize("method", [["sga", "--score_refresh", "step"], ["tau", "--tv_switch_ma", "0.7"]])
def test_sga_step_refresh_and_tau_finish_under_zero3(method, unlearn_case, tmp_path):
    out = tmp_path / method[0]
    port = free_port()
    proc = launch(unlearn_case, out, "--method", *method, port=port)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    # Both ranks removed their CPU all-reduce buffers on the success path too (DeepSpeed never does).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["memorized"] == 0 and report["settings"]["world_size"] == 2
    assert all(r["ma"] < 0.6 for r in read_jsonl(out / "scores_after.jsonl"))


def test_an_io_error_on_rank_0_ends_the_job_loudly(unlearn_case, tmp_path):
    out = tmp_path / "io"
    port = free_port()
    proc = launch(unlearn_case, out, "--method", "ga", "--learning_rate", "1e-3", port=port)
    wait_for(out / "scores_before.jsonl", proc)
    # Made once the run has started (before, it would be an earlier run's file, refused at once):
    # two epochs later rank 0 cannot write its epoch-2 scores there.
    (out / "scores_epoch2.jsonl").mkdir()
    buffers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_0"))
    assert buffers, "DeepSpeed's CPU all-reduce buffer of rank 0 was not where process.shared_memory_buffer() says"
    wait_for(out / "scores_epoch1.jsonl", proc)
    start = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    assert "[rank 0]" in output and "scores_epoch2.jsonl" in output, output[-4000:]
    assert not (out / "report.json").exists() and not (out / "model").exists()
    # The failing rank removed its CPU all-reduce buffer on the way out (the launcher kills rank 1).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_0"))


def test_a_killed_rank_ends_the_job(unlearn_case, tmp_path):
    out = tmp_path / "killed"
    proc = launch(unlearn_case, out, "--method", "ga", "--learning_rate", "1e-3")
    wait_for(out / "scores_before.jsonl", proc)
    pids = rank_pids(out)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    start = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    time.sleep(1)
    assert not rank_pids(out) and not (out / "report.json").exists()


def test_a_killed_launcher_takes_its_ranks_with_it(unlearn_case, tmp_path):
    out = tmp_path / "orphans"
    proc = launch(unlearn_case, out, "--method", "ga", "--learning_rate", "1e-3")
    wait_for(out / "scores_before.jsonl", proc)
    assert set(rank_pids(out)) == {0, 1}
    proc.send_signal(signal.SIGTERM)  # what `timeout` and schedulers send, to the launcher alone
    proc.communicate(timeout=60)
    start = time.time()
    while rank_pids(out) and time.time() - start < 30:
        time.sleep(0.5)
    assert not rank_pids(out), "ranks outlived their launcher"
    time.sleep(2)
    assert not (out / "report.json").exists() and not (out / "model").exists()


def test_bad_input_on_two_ranks_exits_2_without_hanging(unlearn_case, tmp_path):
    # Validation runs on every rank before any collective, and its failure path enters none.
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "a", "input_ids": [1 + i % 60 for i in range(300)]}) + "\n")  # context 256
    from .launcher import deepspeed_run

    start = time.time()
    result = deepspeed_run(
        "launch/score.py",
        "--model",
        unlearn_case["model"],
        "--data",
        long,
        "--out",
        tmp_path / "out" / "s.jsonl",
        "--deepspeed",
        REPO / "configs" / "ds" / "zero3.json",
        timeout=300,
    )
    assert result.returncode == 2 and time.time() - start < 120, tail(result)
    assert "300 tokens, more than the model's context of 256" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()
    proc = launch(unlearn_case, tmp_path / "run", "--num_train_epochs", "0")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "num_train_epochs: must be positive" in output
    assert not (tmp_path / "run").exists()
    # A single-process checkpoint under 2 ranks used to die after loading, a traceback per rank.
    single = tmp_path / "single" / "checkpoint-1"
    single.mkdir(parents=True)
    (single / "unlearn_state.json").write_text('{"epochs": 1}')
    (single / "unlearn_shards_rank0.pt").write_bytes(b"")
    proc = launch(unlearn_case, tmp_path / "resumed", "--resume_from_checkpoint", single)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "was saved by 1 rank without DeepSpeed and this run has 2 ranks with DeepSpeed" in output
    assert not (tmp_path / "resumed").exists()
