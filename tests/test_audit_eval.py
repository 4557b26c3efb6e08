"""Utility beside the audit through lm-evaluation-harness (the ``[eval]`` extra), offline: a
last-word cloze over six KJV verses shipped in ``tests/eval_task``, on a tiny character-level
model that memorized them (so the answer is known: every last word is the model's top choice)."""

import json
import shutil

import pytest
import torch

from ds_unlearn.cli import main
from ds_unlearn.core.toy import save_model, tiny_model

from .conftest import REPO, write_jsonl

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional [eval] extra: pip install -e '.[eval]'")

TASK_DIR = REPO / "tests" / "eval_task"


def char_tokenizer(texts):
    """One token per character (ids 2..), <eos> = 0, <unk> = 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(sorted(set("".join(texts))))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def memorize_batched(model, ids, steps=300, lr=1e-2):
    """Full-batch Adam, all verses in one padded forward per step (labels -100 on padding)."""
    width = max(map(len, ids))
    batch = torch.tensor([s + [0] * (width - len(s)) for s in ids])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
    labels = batch.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=batch, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def verse_model(tmp_path_factory):
    verses = [json.loads(l)["text"] for l in (TASK_DIR / "kjv_cloze.jsonl").read_text().splitlines()]
    tokenizer = char_tokenizer(verses)
    ids = [tokenizer(v)["input_ids"] for v in verses]
    model = memorize_batched(tiny_model("llama", seed=0, vocab_size=64, hidden_size=64), ids)
    path = save_model(model, tmp_path_factory.mktemp("eval") / "model")
    tokenizer.save_pretrained(path)
    return path, ids


def test_eval_tasks_run_beside_the_audit(verse_model, tmp_path, monkeypatch):
    path, ids = verse_model
    work = tmp_path / "work"
    shutil.copytree(TASK_DIR, work)
    monkeypatch.chdir(work)  # the task's data_files path is relative, as a user's would be
    forget = write_jsonl(tmp_path / "f.jsonl", [{"id": f"v{i}", "input_ids": s} for i, s in enumerate(ids[:3])])
    holdout = write_jsonl(tmp_path / "h.jsonl", [{"id": f"h{i}", "input_ids": s[::-1]} for i, s in enumerate(ids[3:])])
    out = tmp_path / "audit"
    argv = ["audit", "--model", path, "--forget", forget, "--holdout", holdout, "--out", out]
    argv += ["--prefix_length", 10, "--suffix_length", 20, "--extract_k", 10, "--el_n", 5, "--bootstrap", 0]
    argv += ["--memorized_threshold", 0.6, "--over_unlearned_threshold", 0.15]  # 3 holdout rows calibrate none
    argv += ["--eval_tasks", "kjv_cloze", "--eval_include_path", work]
    assert main(list(map(str, argv))) == 0
    summary = json.loads((out / "audit.json").read_text())
    results = summary["eval"]["kjv_cloze"]
    assert results["acc,none"] == 1.0  # every verse's last word is the greedy choice
    assert 1.0 <= results["perplexity,none"] < 1.5
    md = (out / "audit.md").read_text()
    assert "## Utility (lm-evaluation-harness)" in md and "| kjv_cloze | acc,none | 1.0000 |" in md


def _one_pair_audit_argv(verse_model, tmp_path, task: str) -> list[str]:
    """An audit of one forget and one holdout verse, asking for ``task`` from TASK_DIR, into tmp_path/out."""
    path, ids = verse_model
    forget = write_jsonl(tmp_path / "f.jsonl", [{"id": "a", "input_ids": ids[0]}])
    holdout = write_jsonl(tmp_path / "h.jsonl", [{"id": "b", "input_ids": ids[1]}])
    argv = ["audit", "--model", path, "--forget", forget, "--holdout", holdout, "--out", tmp_path / "out"]
    argv += ["--prefix_length", 10, "--suffix_length", 20, "--extract_k", 10]
    argv += ["--memorized_threshold", 0.6, "--over_unlearned_threshold", 0.15]  # one holdout row calibrates none
    argv += ["--bootstrap", 0]  # nor bounds an AUC
    argv += ["--eval_tasks", task, "--eval_include_path", TASK_DIR]
    return list(map(str, argv))


def test_unknown_eval_task_is_one_line_before_any_model(verse_model, tmp_path, capsys):
    assert main(_one_pair_audit_argv(verse_model, tmp_path, "no_such_task")) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("ds-unlearn audit: error: --eval_tasks: unknown task 'no_such_task'")
    assert not (tmp_path / "out").exists()


def test_a_task_whose_data_is_missing_is_one_line_before_any_model(verse_model, tmp_path, monkeypatch, capsys):
    # The task YAML's data_files is relative to the working directory: from elsewhere it is missing.
    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the eval tasks were checked")

    monkeypatch.setattr("ds_unlearn.commands.audit.load_for_inference", no_model)
    monkeypatch.chdir(tmp_path)
    assert main(_one_pair_audit_argv(verse_model, tmp_path, "kjv_cloze")) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "--eval_tasks: cannot load the task data (FileNotFoundError" in err[0], err
    assert "kjv_cloze.jsonl" in err[0] and not (tmp_path / "out").exists()


def task_yaml(folder, name, **fields):
    """A task YAML in ``folder``: kjv_cloze with ``fields``, over the same (absolute) data file."""
    import yaml

    base = yaml.safe_load((TASK_DIR / "kjv_cloze.yaml").read_text())
    base["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / "kjv_cloze.jsonl")
    base.update(task=name, **fields)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(base))


GENERATE = {"output_type": "generate_until", "metric_list": [{"metric": "exact_match"}]}
ROLLING = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}"}
ROLLING["metric_list"] = [{"metric": "word_perplexity"}]


@pytest.mark.parametrize(
    ("fields", "no_eos", "message"),
    [
        (
            {**GENERATE, "generation_kwargs": {"until": ["\n"], "max_gen_toks": 256}},
            False,
            "kjv_bad document 0: asks for 256 generated tokens, no fewer than the model's context of 256",
        ),
        (GENERATE, True, "kjv_bad document 0: generate_until needs the tokenizer's EOS token, and it has none"),
        (ROLLING, True, "kjv_bad document 0: an empty context needs a BOS or EOS token to start from; it has none"),
        (
            {"doc_to_target": "{{' ' + text * 8}}"},
            False,
            "kjv_bad document 0: its target is 425 tokens, more than the model's context of 256",
        ),
        ({"doc_to_target": "{{''}}"}, False, "kjv_bad document 0: its target '' is no token at all"),
        ({"doc_to_text": "{{no_such_field.split(' ')}}"}, False, "cannot load the task data (UndefinedError: 'no_such"),
    ],
    ids=["max_gen_toks", "generate_no_eos", "rolling_no_bos_eos", "target_too_long", "empty_target", "bad_template"],
)
def test_a_task_this_model_cannot_run_is_one_line_before_any_model(
    verse_model, tmp_path, monkeypatch, capsys, fields, no_eos, message
):
    """Kind 5: what lm-eval's HFLM would fail on after the whole audit (an assert, a crash, an EOS
    it needs) is refused before any model loads, from the requests lm-eval itself builds."""

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the eval tasks were checked")

    path, ids = verse_model
    if no_eos:  # the same characters, no special token at all
        path = tmp_path / "model"
        shutil.copytree(verse_model[0], path)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
        tok = char_tokenizer([json.loads(l)["text"] for l in (TASK_DIR / "kjv_cloze.jsonl").read_text().splitlines()])
        tok.eos_token = tok.pad_token = None
        tok.save_pretrained(path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task_yaml(tasks, "kjv_bad", **fields)
    monkeypatch.setattr("ds_unlearn.commands.audit.load_for_inference", no_model)
    argv = _one_pair_audit_argv((path, ids), tmp_path, "kjv_bad")
    argv[argv.index("--eval_include_path") + 1] = str(tasks)
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("ds-unlearn audit: error: --eval_tasks: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
