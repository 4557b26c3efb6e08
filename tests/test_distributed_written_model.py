"""The written model is the judged one on 2 CPU ranks (real deepspeed launcher): the guard under
ZeRO-3, a checkpoint saved under one ZeRO stage refused in one line when resumed under another,
and the output lock: a second run is refused on every rank, and no rank is left waiting in its collective."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ds_unlearn.core.files import LOCK_NAME, OutputLock

from .launcher import deepspeed_run, tail
from .test_distributed_faults import launch, rank_pids, wait_for
from .test_distributed_unlearn import ds_args, run_ok

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero2_checkpoint_resumed_under_zero3_is_one_line(unlearn_case, tmp_path):
    out = tmp_path / "run"
    first = ("--method", "ga", "--learning_rate", "1e-7", "--num_train_epochs", 1, "--audit", "none")
    run_ok(*ds_args(unlearn_case, out, "zero2", *first))
    report = json.loads((out / "report.json").read_text())
    assert report["guard"]["ok"] and report["guard"]["checked"] == ["model"], report["guard"]  # on 2 ranks
    checkpoint = next(out.glob("checkpoint-*"))
    resume = ("--num_train_epochs", 2, "--resume_from_checkpoint", checkpoint)
    result = deepspeed_run("launch/unlearn.py", *ds_args(unlearn_case, out, "zero3", *first[:4], *resume), timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and "Traceback" not in result.stderr, tail(result)
    assert errors and all("saved with ZeRO stage 2 and this run has ZeRO stage 3" in e for e in errors), tail(result)


def one_line_per_rank(output: str, message: str) -> list[str]:
    """The error lines of a refused 2-rank job: one per rank, each with ``message``, no traceback."""
    errors = [line for line in output.splitlines() if "error:" in line]
    assert "Traceback" not in output and len(errors) == 2, output[-4000:]
    assert sum(e.startswith("[rank 1] ") for e in errors) == 1, errors
    assert all(message in e for e in errors), errors
    return errors


def test_a_second_two_rank_run_into_a_running_ones_folder_is_refused_on_every_rank(unlearn_case, tmp_path):
    """The output lock under the real launcher: while a 2-rank run works in a folder, a second
    2-rank run into it (even with --overwrite) is refused on both ranks in one line, exit 2, in
    seconds, without touching it; once the first is killed its lock is not held."""
    out = tmp_path / "run"
    # lr 1e-7: nothing is forgotten, so the stop rule never ends it (killed below, long before).
    slow = ("--method", "ga", "--learning_rate", "1e-7", "--num_train_epochs", 5000, "--audit", "none")
    slow += ("--save_resumable", "false")
    first = launch(unlearn_case, out, *slow)
    try:
        wait_for(out / "scores_before.jsonl", first)
        holder = first_rank_0(out)
        start = time.time()
        second = deepspeed_run(
            "launch/unlearn.py", *ds_args(unlearn_case, out, "zero3", *slow, "--overwrite"), timeout=120
        )
        elapsed = time.time() - start
        assert first.poll() is None, ("the first run ended before the second was refused", tail(second))
        # Non-zero (2 from the command; ZeRO-3 ranks may still abort in C++ teardown after it).
        assert second.returncode != 0 and elapsed < 60, (elapsed, tail(second))
        errors = one_line_per_rank(second.stdout + second.stderr, f"output_dir: {out} is in use by another run")
        assert all(f"(process {holder} on " in e for e in errors), errors
        assert (out / "scores_before.jsonl").exists()  # --overwrite removed nothing of the first run
    finally:
        first.send_signal(signal.SIGTERM)  # the launcher alone: its ranks follow (their watchdog)
        first.communicate(timeout=60)
    deadline = time.time() + 30
    while rank_pids(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not rank_pids(out)
    # A killed run's lock blocks nothing. Its file may be left (a rank ended by its watchdog's
    # os._exit) or removed (rank 0 unwound through run_unlearning's finally when its peer's exit
    # failed the collective it was in first): a race, so only "not held" is asserted here.
    assert not OutputLock(out).held()
    lock = OutputLock(out)
    assert lock.acquire() and (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} on ")
    lock.release()


def first_rank_0(out: Path) -> int:
    return rank_pids(out)[0]


def test_one_rank_s_bad_input_before_the_lock_ends_the_job_in_one_line_per_rank(unlearn_case, tmp_path, monkeypatch):
    """Bad input seen by one rank alone, between the first collective and the lock's: that rank
    says why and leaves; the other, waiting in the lock's collective, is released at once (not
    after the 300 s collective timeout) and says so in one line; exit 2, nothing written."""
    for failing in ("0", "1"):
        monkeypatch.setenv("FAIL_RANK", failing)
        out = tmp_path / f"rank{failing}"
        start = time.time()
        result = deepspeed_run(
            "tests/scripts/one_rank_input_error.py", *ds_args(unlearn_case, out, "zero3", "--method", "ga"), timeout=120
        )
        elapsed = time.time() - start
        output = result.stdout + result.stderr
        assert result.returncode != 0 and elapsed < 60, (elapsed, tail(result))
        errors = one_line_per_rank(output, "ds-unlearn unlearn: error: ")
        prefix = "[rank 1] " if failing == "1" else ""
        assert f"{prefix}ds-unlearn unlearn: error: bad input seen by rank {failing} alone" in errors, errors
        assert any("another rank stopped before the output lock was taken" in e for e in errors), errors
        assert not out.exists()


@pytest.mark.parametrize(("stage", "lora"), [("zero3", True), ("zero2", False)])
def test_seed_makes_two_two_rank_runs_bit_identical(unlearn_case, tmp_path, stage, lora):
    """Kind 3 on 2 ranks: --seed covers the adapters' initialisation and LoRA dropout on every rank,
    so two identical runs under the launcher write the same bytes (the written weights) and the
    same per-sequence scores."""
    extra = ("--method", "ga", "--num_train_epochs", 2, "--audit", "none", "--save_resumable", "false")
    extra += ("--lora_r", 4, "--lora_dropout", "0.1") if lora else ()
    written = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    for name in ("a", "b"):
        run_ok(*ds_args(unlearn_case, tmp_path / name, stage, *extra))
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / written).read_bytes() == (b / written).read_bytes()
    assert (a / "scores_after.jsonl").read_text() == (b / "scores_after.jsonl").read_text()
    report = json.loads((a / "report.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["guard"]["ok"]


def embedding_adapter(case, tmp_path):
    from .test_written_model import make_adapter

    return make_adapter(
        tmp_path / "in_adapter",
        case["model"],
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )


def test_zero2_embedding_lora_and_modules_to_save_are_written_whole(unlearn_case, tmp_path):
    """Kind 1 on 2 ZeRO-2 ranks: the embedding adapter and the trained lm_head copy are written
    whole; the guard (every rank's shard) and a peft reload agree with the run's judgement."""
    from safetensors.torch import load_file

    from .test_written_model import assert_written_is_judged

    adapter, out = embedding_adapter(unlearn_case, tmp_path), tmp_path / "out"
    run_ok(*ds_args(unlearn_case, out, "zero2", "--adapter", adapter, "--method", "ga", "--num_train_epochs", 3))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["guard"]["ok"], report["guard"]
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    given = load_file(adapter / "adapter_model.safetensors")
    assert set(state) == {k for k in given if ".base_layer." not in k}
    for key in ("base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.lora_embedding_A"):
        assert state[key].shape == given[key].shape and not (state[key] == given[key]).all(), key  # trained, whole
    assert_written_is_judged(unlearn_case, out)


def test_zero3_refuses_adapters_peft_builds_from_partitioned_weights(unlearn_case, tmp_path):
    # ZeRO-3 loads the base partitioned before the adapter exists: peft cannot build an embedding
    # adapter or a modules_to_save copy from it. One line per rank, exit 2, before any weight loads.
    adapter, out = embedding_adapter(unlearn_case, tmp_path), tmp_path / "out"
    result = deepspeed_run(
        "launch/unlearn.py", *ds_args(unlearn_case, out, "zero3", "--adapter", adapter, "--method", "ga"), timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, tail(result)
    lines = one_line_per_rank(result.stdout + result.stderr, "which peft cannot build on ZeRO-3's partitioned weights")
    assert len(lines) == 2, tail(result)
    assert not out.exists()
