"""``ds-unlearn score`` on one process: outputs, summary, and every bad input (exit 2, one line,
nothing written, before any model compute)."""

import json
import shutil
import subprocess
import sys

import pytest

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl

from .conftest import write_jsonl


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ds_unlearn", "score", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_score_writes_rows_in_order_and_summary(model_dir, ids_file, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(model_dir),
                "--data",
                str(ids_file),
                "--out",
                str(out),
                "--el_n",
                "5",
                "10",
                "--extract_k",
                "8",
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [json.loads(l)["id"] for l in ids_file.read_text().splitlines()]
    assert list(rows[0]) == ["id", "n_tokens", "loss", "ma", "el_5", "el_10", "max_verbatim", "extractable_k8"]
    memorized = [r for r in rows if r["id"].startswith("memorized")]
    assert all(r["ma"] == 1.0 and r["extractable_k8"] for r in memorized)
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert summary["count"] == len(rows)
    assert summary["memorized"] == sum(r["ma"] >= 0.6 for r in rows)
    assert summary["over_unlearned"] == sum(r["ma"] <= 0.15 for r in rows)
    assert summary["means"]["ma"] == pytest.approx(sum(r["ma"] for r in rows) / len(rows))
    assert sum(summary["ma_histogram"]["counts"]) == len(rows)
    assert f"{len(rows)} sequences" in capsys.readouterr().out


def test_score_counts_verdicts_at_the_given_thresholds(model_dir, ids_file, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--model", str(model_dir), "--data", str(ids_file), "--out", str(out), "--extract_k", "8"]
    assert main([*argv, "--memorized_threshold", "0.99", "--over_unlearned_threshold", "0.5"]) == 0
    rows, summary = read_jsonl(out), json.loads((tmp_path / "scores.summary.json").read_text())
    t = summary["thresholds"]
    assert (t["rule"], t["memorized_ma"], t["over_unlearned_ma"], t["holdout_rows"]) == ("levels", 0.99, 0.5, None)
    assert summary["memorized"] == sum(r["ma"] >= 0.99 for r in rows) > 0
    assert summary["over_unlearned"] == sum(r["ma"] <= 0.5 for r in rows) > 0
    assert "memorized: 3; over-unlearned: 3 (ma >= 0.99 memorized, <= 0.5 over-unlearned)" in capsys.readouterr().out


def test_text_rows_are_tokenized_with_the_model_tokenizer(model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer over the tiny vocabulary: "t5 t9 ..." -> ids [5, 9, ...].
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_with_tok = tmp_path / "model"
    shutil.copytree(model_dir, model_with_tok)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(model_with_tok)
    seq = [(7 * i) % 63 + 1 for i in range(30)]
    data = tmp_path / "text.csv"
    data.write_text("name,body\n" + f"a,{' '.join(f't{i}' for i in seq)}\n")
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(model_with_tok),
                "--data",
                str(data),
                "--out",
                str(out),
                "--text_field",
                "body",
                "--id_field",
                "name",
                "--extract_k",
                "4",
            ]
        )
        == 0
    )
    ids_out = tmp_path / "ids.jsonl"
    write_jsonl(tmp_path / "ids_in.jsonl", [{"input_ids": seq}])
    assert (
        main(
            [
                "score",
                "--model",
                str(model_dir),
                "--data",
                str(tmp_path / "ids_in.jsonl"),
                "--out",
                str(ids_out),
                "--extract_k",
                "4",
            ]
        )
        == 0
    )
    by_text, by_ids = read_jsonl(out)[0], read_jsonl(ids_out)[0]
    assert by_text["id"] == "a" and by_ids["id"] == 0
    assert by_text["n_tokens"] == 30 and by_text["loss"] == pytest.approx(by_ids["loss"])


def _bad_cases(model_dir, tmp_path):
    good = {"id": "x", "input_ids": list(range(1, 41))}
    cases = {
        "missing file": ([tmp_path / "nope.jsonl"], "no such file"),
        "unreadable": ([(tmp_path / "bad.jsonl", "{not json\n")], "line 1 (row 0): invalid JSON"),
        "empty": ([(tmp_path / "empty.csv", "id,text\n")], "no rows"),
        "missing text": ([[{"id": "a", "text": None}]], "row 0: field 'text' is missing"),
        "missing id": ([[good, {"id": None, "input_ids": list(range(40))}]], "row 1: field 'id' is missing"),
        "duplicate id": ([[good, good]], "row 1: duplicate id 'x' (first at row 0)"),
        "too short": ([[good, {"id": "s", "input_ids": [1, 2, 3]}]], "row 1: 3 tokens"),
        "text, no tokenizer": (
            [[{"id": "t", "text": "hello there"}]],
            "row 0: has text but the model has no tokenizer",
        ),
        "out of vocab": ([[{"id": "v", "input_ids": [1] * 39 + [99]}]], "row 0: token id 99 is outside the vocabulary"),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_cases(None, __import__("pathlib").Path("/")).keys()))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, model_dir, tmp_path):
    spec, message = _bad_cases(model_dir, tmp_path)[case]
    data = spec[0]
    if isinstance(data, tuple):
        data[0].write_text(data[1])
        data = data[0]
    elif isinstance(data, list):
        data = write_jsonl(tmp_path / "rows.jsonl", data)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("--model", model_dir, "--data", data, "--out", tmp_path / "out.jsonl")
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_needs_overwrite(model_dir, ids_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    out.write_text("keep me\n")
    result = run_cli("--model", model_dir, "--data", ids_file, "--out", out, "--extract_k", 8)
    assert result.returncode == 2 and "exists (pass --overwrite" in result.stderr
    assert out.read_text() == "keep me\n"
    rerun = run_cli("--model", model_dir, "--data", ids_file, "--out", out, "--extract_k", 8, "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert len(read_jsonl(out)) == len(ids_file.read_text().splitlines())


def test_model_dir_without_config_is_an_input_error(tmp_path, ids_file):
    result = run_cli("--model", tmp_path, "--data", ids_file, "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2 and "is not a model directory" in result.stderr


def test_ctrl_c_on_one_process_is_one_line_and_exit_130(model_dir, ids_file, tmp_path, monkeypatch, capsys):
    import ds_unlearn.core.passes as passes

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "teacher_forced_pass", interrupted)
    monkeypatch.setattr("ds_unlearn.core.scorer.teacher_forced_pass", interrupted)
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--model", str(model_dir), "--data", str(ids_file), "--out", str(out), "--extract_k", "8"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.splitlines()[-1] == "ds-unlearn score: interrupted" and "Traceback" not in err
    assert not out.exists()
