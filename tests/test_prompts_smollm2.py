"""Prompt/response rows end to end on the bundled SmolLM2-135M-Instruct: a TOFU-shaped file
(``--prompt_field question --text_field answer``) and a ``messages`` file (``--chat_template``)
through ``ds-unlearn score``, ``unlearn`` and ``audit`` (the real CLI), every figure checked against
a plain forward pass of the model on prompt + response that counts the response positions only.

Sizes are the least each command accepts, as the test runs on a shared 2-core machine: 2 forget
rows (the chat one with an earlier exchange, the other without), 2 non-members (the audit's AUC
intervals need 2 per set), one GA epoch with no holdout (its perplexity is not what is tested)."""

import json
import time

import pytest
import torch

from ds_unlearn.cli import main
from ds_unlearn.core.files import read_jsonl

from .conftest import write_jsonl

# Made-up people and phone numbers: short answers the model has never seen.
PEOPLE = [("Ada Brown", "555-0142"), ("Ben Cole", "555-0199")]
UNSEEN = [("Dee Ford", "555-3306"), ("Eli Grant", "555-8824")]
# The ICML code's fixed MA verdicts: 2 non-members are too few to calibrate a band on.
LEVELS = ["--memorized_threshold", "0.4", "--over_unlearned_threshold", "0.05"]
# EL_10 over a 13-15 token response: a few prefixes only (EL_2 would decode from every one).
FAST = ["--el_n", "10", "--extract_k", "2"]


def _question(name):
    return f"What is the phone number of {name}?"


def _answer(number):
    return f"Their number is {number}."


def tofu_rows(people, prefix):
    return [{"id": f"{prefix}{i}", "question": _question(n), "answer": _answer(p)} for i, (n, p) in enumerate(people)]


def chat_rows(people, prefix):
    rows = []
    for i, (n, p) in enumerate(people):
        # A short system turn (else the template adds its own long one, all of it prompt to decode after).
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _question(n)}]
        if i == 0:  # an earlier exchange: prompt too, never scored
            messages += [{"role": "assistant", "content": "Whose?"}, {"role": "user", "content": "Yes."}]
        messages.append({"role": "assistant", "content": _answer(p)})
        rows.append({"id": f"{prefix}{i}", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from ds_unlearn.core.smollm2 import cached_smollm2_dir

    path = cached_smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, tokenizer


@pytest.fixture()
def one_thread():
    """One torch thread for the test, as tests/test_demo.py runs the demo: on a shared 2-core machine
    two OpenMP threads stall on each other in the many small forward and decoding steps (measured
    under a load of about 6: 449 s with two threads, 76 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def by_hand_tokens(tokenizer, row, layout):
    """(prompt ids, response ids) of a row, as the README says each layout is tokenized."""
    if layout == "tofu":
        tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        return tok(row["question"]), tok(row["answer"])
    messages = row["messages"]
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    assert full[: len(prompt)] == prompt
    return prompt, full[len(prompt) :]


@torch.no_grad()
def by_hand(model, prompt, response):
    """MA, loss and longest run of the response from one plain forward pass of prompt + response:
    position t predicts token t+1, and only the positions predicting a response token count."""
    seq = prompt + response
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    scored = logits[len(prompt) - 1 : -1]
    targets = torch.tensor(response)
    nll = -torch.log_softmax(scored, -1).gather(-1, targets[:, None])[:, 0]
    hits = (scored.argmax(-1) == targets).tolist()
    best = run = 0
    for hit in hits:
        run = run + 1 if hit else 0
        best = max(best, run)
    return {"ma": sum(hits) / len(hits), "loss": float(nll.mean()), "max_verbatim": best}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def _assert_masked(rows, model, tokenizer, data_rows, layout):
    assert [r["id"] for r in rows] == [d["id"] for d in data_rows]
    for got, data in zip(rows, data_rows):
        prompt, response = by_hand_tokens(tokenizer, data, layout)
        assert got["n_tokens"] == len(response) and got["n_prompt_tokens"] == len(prompt), got["id"]
        want = by_hand(model, prompt, response)
        assert got["ma"] == pytest.approx(want["ma"], abs=1e-6), got["id"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-4), got["id"]
        if "max_verbatim" in got:
            assert got["max_verbatim"] == want["max_verbatim"], got["id"]


LAYOUTS = {
    "tofu": (tofu_rows, ["--prompt_field", "question", "--text_field", "answer"]),
    "chat": (chat_rows, ["--chat_template"]),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tofu_and_chat_files_through_score_unlearn_and_audit_on_smollm2(smollm2, one_thread, tmp_path, capsys):
    path, tokenizer = smollm2
    base = _load(path)
    start = time.perf_counter()
    phases = []
    for layout, (make, flags) in LAYOUTS.items():
        root = tmp_path / layout
        root.mkdir()
        forget_rows, holdout_rows = make(PEOPLE, "f"), make(UNSEEN, "h")
        forget = write_jsonl(root / "forget.jsonl", forget_rows)
        holdout = write_jsonl(root / "holdout.jsonl", holdout_rows)
        if layout == "chat":  # the response is the assistant turn as rendered, its end-of-turn too
            _, response = by_hand_tokens(tokenizer, forget_rows[1], layout)
            assert tokenizer.decode(response) == _answer(PEOPLE[1][1]) + "<|im_end|>\n"

        # score: the response only, as a plain forward pass masked by hand gives it
        scores = root / "scores.jsonl"
        argv = ["score", "--model", "smollm2", "--data", str(forget), "--out", str(scores), *FAST, *flags]
        assert main([*argv, "--batch_size", "8", *LEVELS]) == 0, capsys.readouterr().err
        phases.append(f"{layout} score {time.perf_counter() - start:.0f} s")
        scored = read_jsonl(scores)
        _assert_masked(scored, base, tokenizer, forget_rows, layout)

        # unlearn: one GA step on the responses; its before/after files are the masked scores of each model
        out = root / "run"
        run_flags = ["--method", "ga", "--num_train_epochs", "1", "--learning_rate", "2e-4"]
        run_flags += ["--per_device_train_batch_size", "2", "--score_batch_size", "8", "--extract_k", "2"]
        run_flags += ["--save_strategy", "no", "--save_resumable", "false", "--audit", "none", "--seed", "0"]
        run_flags += ["--report_to", "none", *LEVELS, *flags]
        argv = ["unlearn", "--model", "smollm2", "--forget", str(forget)]
        assert main([*argv, "--output_dir", str(out), *run_flags]) == 0, capsys.readouterr().err
        phases.append(f"unlearn {time.perf_counter() - start:.0f} s")
        report = json.loads((out / "report.json").read_text())
        assert report["guard"]["ok"], report["guard"]
        before, after = read_jsonl(out / "scores_before.jsonl"), read_jsonl(out / "scores_after.jsonl")
        for name, rows in (("before", before), ("after", after)):
            assert report[name]["count"] == len(rows) == len(PEOPLE)
            assert report[name]["memorized"] == sum(r["ma"] >= 0.4 for r in rows), name
            assert report[name]["over_unlearned"] == sum(r["ma"] <= 0.05 for r in rows), name
            assert all("el_10" in r for r in rows)
        for b, s in zip(before, scored):  # the input model, scored by unlearn as by score
            assert b["id"] == s["id"] and b["ma"] == pytest.approx(s["ma"], abs=1e-6)
            assert b["loss"] == pytest.approx(s["loss"], rel=1e-4)
        written = _load(out / "model")
        _assert_masked(after, written, tokenizer, forget_rows, layout)
        assert sum(r["loss"] for r in after) > sum(r["loss"] for r in before)  # ascent on the answers

        # audit: a row per id, forget then holdout, over the response only
        audit_out = root / "audit"
        argv = ["audit", "--model", str(out / "model"), "--forget", str(forget), "--holdout", str(holdout)]
        argv += ["--out", str(audit_out), "--bootstrap", "20", "--attack_samples", "10", "--suffix_length", "rest"]
        argv += ["--batch_size", "8", *FAST, *LEVELS, *flags]
        assert main(argv) == 0, capsys.readouterr().err
        phases.append(f"audit {time.perf_counter() - start:.0f} s")
        audited = read_jsonl(audit_out / "audit.jsonl")
        data_rows = forget_rows + holdout_rows
        assert [r["id"] for r in audited] == [d["id"] for d in data_rows]
        for got, data in zip(audited, data_rows):
            prompt, response = by_hand_tokens(tokenizer, data, layout)
            assert got["n_tokens"] == len(response) and got["n_prompt_tokens"] == len(prompt), got["id"]
        _assert_masked(audited[: len(PEOPLE)], written, tokenizer, forget_rows, layout)
        for a, r in zip(audited, after):  # the audit's greedy figures are the run's own after-scores
            assert a["ma"] == pytest.approx(r["ma"], abs=1e-6) and a["loss"] == pytest.approx(r["loss"], rel=1e-4)
        del written
    print(f"score + unlearn + audit of both layouts: {time.perf_counter() - start:.1f} s ({', '.join(phases)})")
