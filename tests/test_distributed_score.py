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
