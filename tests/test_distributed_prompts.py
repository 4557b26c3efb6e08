"""Prompt/response rows on 2 CPU ranks under ZeRO-3 with the real launcher: the
prompt-masked scores and the NPO unlearning (forget term, retain term and reference values over
the response only) equal one process's, and the written model rescored with the prompt masked by
hand reproduces them."""

import json

import pytest

from ds_unlearn import score_sequences
from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.core.models import load_causal_lm

from .conftest import unlearn_args
from .launcher import REPO, deepspeed_run, tail
from .test_prompts import PROMPT, prompted_case  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_zero3_two_ranks_unlearn_prompted_rows_as_one_process(prompted_case, tmp_path):  # noqa: F811
    extra = ("--method", "npo", "--num_train_epochs", "3", "--per_device_train_batch_size", "2")
    two = tmp_path / "two"
    args = [*unlearn_args(prompted_case, two, *extra), "--deepspeed", REPO / "configs" / "ds" / "zero3.json"]
    result = deepspeed_run("launch/unlearn.py", *args)
    assert result.returncode == 0, tail(result)
    one = tmp_path / "one"
    assert main(["unlearn", *unlearn_args(prompted_case, one, *extra[:4], "--per_device_train_batch_size", "4")]) == 0
    for name in ("scores_before.jsonl", "scores_after.jsonl"):
        a, b = read_jsonl(one / name), read_jsonl(two / name)
        assert [r["id"] for r in a] == [r["id"] for r in b]
        for ra, rb in zip(a, b):
            assert rb["n_tokens"] == ra["n_tokens"] == 16 and rb["n_prompt_tokens"] == PROMPT
            assert rb["ma"] == pytest.approx(ra["ma"], abs=0.05) and rb["loss"] == pytest.approx(ra["loss"], rel=2e-3)
    report = json.loads((two / "report.json").read_text())
    assert report["guard"]["ok"], report["guard"]
    written = load_causal_lm(two / "model")
    full = prompted_case["forget_full"]
    again = score_sequences(written, full, el_n=(10,), extract_k=(8,), prompt_lengths=[PROMPT] * len(full))
    for row, want in zip(read_jsonl(two / "scores_after.jsonl"), again):
        assert row["ma"] == pytest.approx(want["ma"]) and row["loss"] == pytest.approx(want["loss"], rel=1e-5)
    audit = read_jsonl(two / "audit_after.jsonl")
    assert all(r["n_prompt_tokens"] == PROMPT for r in audit)
