"""The prompt/chat refusals at the CLI, under ``unlearn`` and ``audit``: a prompt field
that is not a string, ``messages`` without an assistant turn, ``--chat_template`` on a tokenizer
with no chat template, rows with and without a prompt in one file, a prompt that leaves no response
token within ``--max_length``. Each exits 2 with one line on stderr and no traceback, writes nothing,
and leaves the inputs byte-identical (test_bad_input.py's ``check``)."""

import shutil

import pytest

from ds_unlearn.cli import main

from .conftest import unlearn_args, write_jsonl
from .test_bad_input import check, digest
from .test_prompts import CHAT


def _words(ids):
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def prompt_case(unlearn_case, tmp_path_factory):
    """``unlearn_case``'s checkpoint with a word-level tokenizer ("t5 t9" -> [5, 9]) beside it, with
    and without a chat template; its rows as prompt/response text (a 6-token prompt), and broken files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ds_unlearn.core.files import read_jsonl

    root = tmp_path_factory.mktemp("prompt_bad")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    case = {"root": root}
    for name, template in (("model", CHAT), ("untemplated", None)):
        shutil.copytree(unlearn_case["model"], root / name)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
        if template:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(root / name)
        case[name] = root / name
    for name in ("forget", "retain", "holdout"):
        rows = [{"id": r["id"], "prompt": _words(r["input_ids"][:6]), "text": _words(r["input_ids"][6:])}
                for r in read_jsonl(unlearn_case[name])]  # fmt: skip
        case[name] = write_jsonl(root / f"{name}.jsonl", rows)
        case[f"{name}_rows"] = rows
    good = case["forget_rows"]
    turns = lambda r: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]}]
    chat = [{"id": r["id"], "messages": turns(r)} for r in good]
    files = {
        "not_a_string": [good[0], {**good[1], "prompt": 3}],
        "no_assistant": [chat[0], {"id": chat[1]["id"], "messages": chat[1]["messages"][:1]}],
        "chat": chat,
        "mixed": [good[0], {"id": good[1]["id"], "text": good[1]["prompt"] + " " + good[1]["text"]}],
    }
    for name, rows in files.items():
        case[name] = write_jsonl(root / f"{name}.jsonl", rows)
    return case


CASES = {  # name: (flag, file, extra flags, model, expected text in the error line)
    "prompt not a string": (
        "--forget",
        "not_a_string",
        [],
        "model",
        "--forget row 1: prompt field 'prompt' is an integer, not a string (--prompt_field)",
    ),
    "messages without an assistant turn": (
        "--forget",
        "no_assistant",
        ["--chat_template"],
        "model",
        "--forget row 1: 'messages' has no assistant turn",
    ),
    "chat template on a tokenizer without one": (
        "--forget",
        "chat",
        ["--chat_template"],
        "untemplated",
        "--chat_template: the model's tokenizer has no chat template",
    ),
    "mixed rows without --mixed_prompts": (
        "--forget",
        "mixed",
        [],
        "model",
        "--forget row 1: has no prompt but row 0 has one",
    ),
    "mixed rows in the holdout": (
        "--holdout",
        "mixed",
        [],
        "model",
        "--holdout row 1: has no prompt but row 0 has one",
    ),
}

# unlearn refuses so short a --max_length before reading any row (it must leave room for EL_10).
AUDIT_CASES = {
    **CASES,
    "a prompt leaving no response token within max_length": (
        "--forget",
        "forget",
        ["--max_length", "6"],
        "model",
        "--forget row 0: its prompt of 6 tokens leaves no response token within --max_length 6",
    ),
}


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


def _watched(case):
    return [case["model"], case["untemplated"], case["forget"], case["retain"], case["holdout"]] + [
        case[n] for n in ("not_a_string", "no_assistant", "chat", "mixed")
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_unlearn_refuses_bad_prompt_rows(name, prompt_case, tmp_path, capsys):
    flag, file, extra, model, message = CASES[name]
    out = tmp_path / "run"
    argv = [str(x) for x in unlearn_args(prompt_case, out)]
    argv = _replace(_replace(argv, flag, prompt_case[file]), "--model", prompt_case[model])
    before = digest(_watched(prompt_case))
    code = main(["unlearn", *argv, *extra])
    check(capsys, code, message, _watched(prompt_case), before, out)


@pytest.mark.parametrize("name", list(AUDIT_CASES))
def test_audit_refuses_bad_prompt_rows(name, prompt_case, tmp_path, capsys):
    flag, file, extra, model, message = AUDIT_CASES[name]
    out = tmp_path / "audit"
    c = prompt_case
    argv = ["--model", c[model], "--forget", c["forget"], "--holdout", c["holdout"], "--out", out]
    argv = _replace([str(x) for x in argv], flag, c[file])
    argv += ["--extract_k", "4", "--el_n", "4", "--prefix_length", "4", "--suffix_length", "rest", "--bootstrap", "10"]
    argv += ["--memorized_threshold", "0.6", "--over_unlearned_threshold", "0.15", *extra]
    before = digest(_watched(c))
    code = main(["audit", *argv])
    check(capsys, code, message, _watched(c), before, out)
