"""The real deepspeed launcher, 2 CPU ranks, ZeRO-3: the same scores file as one process."""

import re

import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl

from .launcher import REPO, deepspeed_run, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero3_two_ranks_match_one_process(model_dir, ids_file, tmp_path):
    one = tmp_path / "one.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(model_dir),
                "--data",
                str(ids_file),
                "--out",
                str(one),
                "--extract_k",
                "8",
                "--el_n",
                "5",
                "10",
                "--batch_size",
                "2",
            ]
        )
        == 0
    )
    two = tmp_path / "two.jsonl"
    # 9 rows over 2 ranks: uneven shards, and different continuation work on each rank.
    result = deepspeed_run(
        "launch/score.py",
        "--model",
        model_dir,
        "--data",
        ids_file,
        "--out",
        two,
        "--extract_k",
        8,
        "--el_n",
        5,
        10,
        "--batch_size",
        2,
        "--deepspeed",
        REPO / "configs/ds/zero3.json",
    )
    assert result.returncode == 0, tail(result)
    held = re.search(r"ZeRO-3: rank 0 holds ([\d,]+) of ([\d,]+) parameter elements", result.stdout)
    assert held, tail(result)
    local, total = (int(g.replace(",", "")) for g in held.groups())
    assert local < 0.6 * total  # loaded partitioned: no rank holds the checkpoint
    a, b = read_jsonl(one), read_jsonl(two)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["id"], key)
            else:
                assert rb[key] == ra[key], (ra["id"], key)
    assert (tmp_path / "two.summary.json").exists()


def _score_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", out, "--extract_k", 8, "--el_n", 10, *extra]


def test_zero3_gather_once_and_per_forward_match_one_process_at_full_context(tmp_path):
    """A GPT-Neo with 64 learned positions, rows of exactly 64 tokens among shorter ones: on 2 ranks
    under ZeRO-3, gathering the model once and gathering every layer per forward (lockstep) both
    give the one-process scores, and no continuation steps past a row's last position."""
    from ds_unlearn.core.toy import memorize, random_sequences, save_model, tiny_model

    from .conftest import write_jsonl

    known = random_sequences(2, 64, 64, seed=41)
    model = memorize(tiny_model("gpt_neo", seed=4, vocab_size=64, max_positions=64), known, steps=80)
    model_dir = save_model(model, tmp_path / "neo64")
    seqs = [*known, known[0][:20] + [1 + known[0][20] % 63] + known[0][21:], *random_sequences(4, [64, 63, 40, 64], 64)]
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": f"r{i}", "input_ids": s} for i, s in enumerate(seqs)])
    one = tmp_path / "one.jsonl"
    assert main(["score", *map(str, _score_args(model_dir, data, one))]) == 0
    expected = read_jsonl(one)
    for mode in ("once", "per_forward"):
        out = tmp_path / f"{mode}.jsonl"
        args = _score_args(model_dir, data, out, "--batch_size", 3, "--zero3_gather", mode)
        result = deepspeed_run("launch/score.py", *args, "--deepspeed", REPO / "configs/ds/zero3.json", timeout=300)
        assert result.returncode == 0, tail(result)
        for ra, rb in zip(expected, read_jsonl(out)):
            for key in ra:
                if isinstance(ra[key], float):
                    assert rb[key] == pytest.approx(ra[key], abs=1e-5), (mode, ra["id"], key)
                else:
                    assert rb[key] == ra[key], (mode, ra["id"], key)
