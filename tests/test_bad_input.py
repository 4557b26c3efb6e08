"""The bad-input battery: every kind of bad input a user can type, one test each, against
``score`` and ``unlearn`` (``memorize``'s are in test_dynamics.py). Each must exit 2 with one
line naming the file / field / row, no traceback, no output path created, and the input
checkpoint and data files byte-identical. (Faults on 2 ranks: test_distributed_faults.py.)"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ds_unlearn.cli import main

from .conftest import VOCAB, unlearn_args, write_jsonl


def digest(paths) -> dict:
    out = {}
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def case(unlearn_case, tmp_path_factory):
    """Inputs of every kind, made once: the tiny checkpoint, its data, and broken variants."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "empty": root / "empty.jsonl",
        "broken": root / "broken.jsonl",
        "not_object": root / "not_object.jsonl",
        "no_text": root / "no_text.jsonl",
        "dup": root / "dup.jsonl",
        "vocab": root / "vocab.jsonl",
        "short": root / "short.jsonl",
        "long": root / "long.jsonl",
        "badext": root / "data.txt",
        "bad_ds": root / "bad_ds.json",
        "bad_yaml_value": root / "bad_value.yaml",
        "unknown_key": root / "unknown_key.yaml",
        "yaml_type": root / "yaml_type.yaml",
        "a_file": root / "a_file",
    }
    files["empty"].write_text("")
    good = [json.loads(line) for line in Path(unlearn_case["forget"]).read_text().splitlines()]
    files["broken"].write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{not json\n")
    files["not_object"].write_text(json.dumps(good[0]) + "\n[1, 2, 3]\n")
    write_jsonl(files["no_text"], [{"id": "a", "other": 1}])
    write_jsonl(
        files["dup"], [{"id": "a", "input_ids": good[0]["input_ids"]}, {"id": "a", "input_ids": good[1]["input_ids"]}]
    )
    write_jsonl(
        files["vocab"], [{"id": "a", "input_ids": good[0]["input_ids"]}, {"id": "b", "input_ids": [1, VOCAB + 5] * 12}]
    )
    write_jsonl(files["short"], [{"id": "a", "input_ids": [1, 2, 3]}])
    write_jsonl(files["long"], [{"id": "a", "input_ids": [1 + i % 60 for i in range(300)]}])  # context is 256
    files["one_row"] = root / "one_row.jsonl"
    write_jsonl(files["one_row"], good[:1])
    files["one_unseen"] = root / "one_unseen.jsonl"
    write_jsonl(files["one_unseen"], [json.loads(Path(unlearn_case["holdout"]).read_text().splitlines()[0])])
    files["badext"].write_text("x")
    files["bad_ds"].write_text("{ not json")
    files["bad_yaml_value"].write_text("sga_gamma: high\n")
    files["unknown_key"].write_text("learnin_rate: 0.1\n")
    files["yaml_type"].write_text("max_length: 20.5\n")
    files["a_file"].write_text("not a directory")
    files["holdout_copy"] = root / "holdout_copy.jsonl"
    shutil.copy(unlearn_case["forget"], files["holdout_copy"])  # the forget set under another name
    truncated = root / "truncated"
    shutil.copytree(unlearn_case["model"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    files["truncated"] = truncated
    return {**unlearn_case, **files, "root": root}


SCORE_CASES = {  # name: (extra args builder, expected text in the error line)
    "missing data file": (lambda c, o: ["--data", c["root"] / "nope.jsonl"], "no such file"),
    "unknown extension": (lambda c, o: ["--data", c["badext"]], "unknown extension"),
    "empty data file": (lambda c, o: ["--data", c["empty"]], "holds no rows"),
    "broken JSONL row": (lambda c, o: ["--data", c["broken"]], "line 3 (row 2): invalid JSON"),
    "row not an object": (lambda c, o: ["--data", c["not_object"]], "line 2 (row 1): expected a JSON object"),
    "missing text field": (lambda c, o: ["--data", c["no_text"]], "row 0: field 'text' is missing"),
    "duplicate id": (lambda c, o: ["--data", c["dup"]], "row 1: duplicate id 'a'"),
    "token outside vocabulary": (lambda c, o: ["--data", c["vocab"]], "row 1: token id 69 is outside"),
    "sequence too short": (lambda c, o: ["--data", c["short"]], "row 0: 3 tokens"),
    "sequence past the context": (
        lambda c, o: ["--data", c["long"]],
        "row 0: 300 tokens, more than the model's context of 256",
    ),
    "batch size 0": (lambda c, o: ["--batch_size", 0], "argument --batch_size: expected a positive integer"),
    "el_n 0": (lambda c, o: ["--el_n", 0], "el_n must hold positive integers"),
    "max_length too short": (lambda c, o: ["--max_length", 5], "--max_length 5 is shorter"),
    "out equals data": (lambda c, o: ["--out", c["forget"], "--overwrite"], "lies inside the input"),
    "out inside the model": (lambda c, o: ["--out", c["model"] / "s.jsonl"], "lies inside the input"),
    "out is a directory": (lambda c, o: ["--out", c["root"]], "is a directory"),
    "out under a file": (lambda c, o: ["--out", c["a_file"] / "s.jsonl"], "cannot create"),
    "model not a checkpoint": (lambda c, o: ["--model", c["root"]], "is not a model directory"),
    "truncated weights": (lambda c, o: ["--model", c["truncated"]], "cannot load the weights"),
    "missing deepspeed file": (lambda c, o: ["--deepspeed", c["root"] / "nope.json"], "--deepspeed: no such file"),
    "malformed deepspeed JSON": (lambda c, o: ["--deepspeed", c["bad_ds"]], "bad_ds.json is not valid JSON"),
    "bad dist timeout": (lambda c, o: ["--dist_timeout_s", "-1"], "--dist_timeout_s: must be positive"),
    "bad flag value": (lambda c, o: ["--batch_size", "many"], "argument --batch_size: expected a positive integer"),
    "thresholds the wrong way round": (
        lambda c, o: ["--memorized_threshold", "0.1", "--over_unlearned_threshold", "0.2"],
        "need 0 <= over_unlearned_threshold < memorized_threshold <= 1",
    ),
}


def score_argv(c, out, extra):
    base = {"--model": c["model"], "--data": c["forget"], "--out": out, "--extract_k": 8}
    extra = [str(x) for x in extra]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    return ["score", *[str(x) for kv in base.items() for x in kv], *extra]


UNLEARN_CASES = {
    # The case's holdout has 4 rows: two scores judged by position at 0.05 need 40.
    "holdout too small to calibrate": (
        ["--band_on", "ma,loss"],
        "holdout: 4 row(s) cannot calibrate verdicts at quantile 0.025 per side and score: it needs at least 40",
    ),
    "unknown band score": (["--band_on", "ma,perplexity"], "band_on: must be a comma list of ma, loss"),
    "MA levels without an MA verdict": (["--band_on", "loss"], "MA levels are read only when band_on includes ma"),
    "band beyond MA with step refresh": (
        ["--band_on", "ma,loss", "--score_refresh", "step"],
        "score_refresh=step judges MA only",
    ),
    "no epochs": (["--num_train_epochs", "0"], "num_train_epochs: must be positive"),
    "negative learning rate": (["--learning_rate=-1e-3"], "learning_rate: must be positive"),
    "holdout is the forget file": (lambda c: ["--holdout", c["forget"]], "holdout: is the forget set's own file"),
    "holdout repeats the forget rows": (lambda c: ["--holdout", c["holdout_copy"]], "--holdout row 0: the same tokens"),
    "missing checkpoint to resume": (
        lambda c: ["--resume_from_checkpoint", c["root"] / "checkpoint-9"],
        "no unlearn_state.json",
    ),
    "output_dir is a file": (lambda c: ["--output_dir", c["a_file"]], "is a file, not a directory"),
    "output inside the model": (lambda c: ["--output_dir", c["model"] / "out"], "lies inside the input"),
    "bad YAML value": (
        lambda c: ["--config", c["bad_yaml_value"]],
        "bad_value.yaml: key 'sga_gamma': invalid float",
    ),
    "unknown YAML key": (lambda c: ["--config", c["unknown_key"]], "unknown key 'learnin_rate'"),
    "YAML value of the wrong type": (
        lambda c: ["--config", c["yaml_type"]],
        "yaml_type.yaml: key 'max_length': expected an integer, got 20.5",
    ),
    "output_dir under a file": (lambda c: ["--output_dir", c["a_file"] / "sub"], "a_file is a file"),
    "batch size 0": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size: must be at least 1"),
    "negative seed": (["--seed", "-1"], "seed: must lie in [0, 4294967295], got -1"),
    "unknown flag": (["--learnin_rate", "1"], "unknown flag --learnin_rate"),
    "bad flag value after a space": (["--sga_gamma", "high"], "argument --sga_gamma"),
    "gamma out of range": (["--method", "sga", "--sga_gamma", "2"], "sga_gamma: must lie in [0, 1]"),
    "unknown method": (["--method", "forgetful"], "method: must be one of"),
    "unknown audit": (["--audit", "sometimes"], "audit: must be one of both, after, none"),
    "malformed deepspeed JSON": (lambda c: ["--deepspeed", c["bad_ds"]], "bad_ds.json is not valid JSON"),
    "missing forget file": (lambda c: ["--forget", c["root"] / "nope.jsonl"], "--forget: no such file"),
    "truncated weights": (lambda c: ["--model", c["truncated"]], "cannot load the weights"),
    "sequence past the context": (lambda c: ["--forget", c["long"]], "--forget row 0: 300 tokens"),
    # The end-of-run audit's AUC intervals need 2 rows a side: refused before training, not after.
    "one-row forget set with the audit on": (
        lambda c: ["--forget", c["one_row"], "--audit", "after"],
        "--forget: 1 row, but the AUCs' bootstrap intervals",
    ),
    "one-row audit holdout": (
        lambda c: ["--audit_holdout", c["one_unseen"], "--audit", "after"],
        "--audit_holdout: 1 row, but the AUCs' bootstrap intervals",
    ),
    "unknown reporter": (["--report_to", "bogus"], "report_to: unknown reporter 'bogus'"),
    "a setting the method never reads": (
        ["--method", "ga", "--npo_beta", "0.5"],
        "npo_beta: only applies to npo, not ga",
    ),
    "gamma under the band rule": (
        ["--method", "sga", "--sga_gamma", "0.8"],
        "sga_gamma: not read under stop_rule band",
    ),
    # NaN passes `x <= 0` checks (the guard would trip on every epoch and return the input model);
    # inf overflowed the Trainer's step count; TrainingArguments' own floats are checked too.
    "NaN utility guard": (["--max_holdout_loss_increase", "nan"], "max_holdout_loss_increase: must be a finite number"),
    "NaN TrainingArguments float": (["--adam_beta2", "nan"], "adam_beta2: must be a finite number, got nan"),
    "infinite epochs": (["--num_train_epochs", "inf"], "num_train_epochs: must be a finite number, got inf"),
    "fractional epochs": (["--num_train_epochs", "1.5"], "num_train_epochs: must be whole epochs"),
    "NaN task-vector coefficient": (["--method", "tau", "--tv_coefficient", "nan"], "tv_coefficient: must be a finite"),
}


def check(capsys, code, message, watched, before, absent):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert err and message in err[-1], err
    assert len(err) == 1 and "Traceback" not in "\n".join(err), err
    assert not absent.exists(), f"{absent} was created"
    assert digest(watched) == before, "an input changed"


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_bad_input(name, case, tmp_path, capsys):
    build, message = SCORE_CASES[name]
    out = tmp_path / "new" / "scores.jsonl"
    watched = [case["model"], case["forget"], case["truncated"]]
    before = digest(watched)
    code = main(score_argv(case, out, build(case, out)))
    check(capsys, code, message, watched, before, tmp_path / "new")


@pytest.mark.parametrize("name", list(UNLEARN_CASES))
def test_unlearn_bad_input(name, case, tmp_path, capsys):
    extra, message = UNLEARN_CASES[name]
    extra = [str(x) for x in (extra(case) if callable(extra) else extra)]
    out = tmp_path / "run"
    argv = [str(x) for x in unlearn_args(case, out)]
    for flag in ("--output_dir", "--forget", "--holdout", "--model"):  # the case's own value wins
        if flag in extra and flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    watched = [case["model"], case["forget"], case["holdout"], case["truncated"]]
    before = digest(watched)
    code = main(["unlearn", *argv, *extra])
    check(capsys, code, message, watched, before, out)


def test_unlearn_without_output_dir_writes_nothing(case, tmp_path, capsys, monkeypatch):
    # TrainingArguments alone would default to ./trainer_output and run the whole job there.
    monkeypatch.chdir(tmp_path)
    argv = [str(x) for x in unlearn_args(case, tmp_path / "unused")]
    i = argv.index("--output_dir")
    del argv[i : i + 2]
    watched = [case["model"], case["forget"], case["holdout"]]
    before = digest(watched)
    code = main(["unlearn", *argv])
    check(capsys, code, "output_dir: required", watched, before, tmp_path / "trainer_output")
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_reading_data_leaves_no_files_behind(tmp_path, monkeypatch):
    # Every format, read with the caches pointed at empty folders: nothing may appear in them.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ds_unlearn.core.data import read_rows

    caches = tmp_path / "caches"
    caches.mkdir()
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(caches / var))
    rows = [{"id": "a", "input_ids": [1, 2, 3]}, {"id": "b", "input_ids": [4, 5, 6]}]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "x.jsonl", rows)
    (data / "x.csv").write_text('id,input_ids\na,"[1, 2, 3]"\nb,"[4, 5, 6]"\n')
    pq.write_table(pa.Table.from_pylist(rows), data / "x.parquet")
    before = sorted(p.name for p in data.iterdir())
    for name in ("x.jsonl", "x.csv", "x.parquet"):
        assert read_rows(data / name) == rows, name
    assert not any(caches.rglob("*")), sorted(caches.rglob("*"))
    assert sorted(p.name for p in data.iterdir()) == before
