"""``ds-unlearn demo --chat``: the records as answers in chats (a user asks for a person's phone
number, the assistant answers with the record), rendered by SmolLM2's own chat template, planted,
unlearned and audited on the answer only, in ``DIR/chat`` with one more table in the report.

The end-to-end test runs the quick demo with ``--chat`` and two methods (GA, the papers' rule, and
TAU, the band rule) on one thread, as tests/test_demo.py runs the plain one.
"""

import contextlib
import io
import json
import time

import pytest
import torch

from ds_unlearn import cli
from ds_unlearn.core.files import read_jsonl
from ds_unlearn.demo.data import CHAT_QUESTION, personal_records
from ds_unlearn.demo.run import CHAT_DIR, OWN_ENTRIES, QUICK, chat_sets, demo_sets

METHODS = ("ga", "tau")
TITLES = {"ga": "GA (baseline)", "tau": "TAU"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ds_unlearn.core.smollm2 import cached_smollm2_dir

    return AutoTokenizer.from_pretrained(cached_smollm2_dir(), local_files_only=True)


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def by_hand_tokens(tokenizer, messages):
    """(prompt ids, answer ids) of a chat, rendered by the template directly: the prompt is the
    conversation before the answer with the generation prompt, the answer the rest."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    assert full[: len(prompt)] == prompt
    return prompt, full[len(prompt) :]


# ---- fast ----------------------------------------------------------------------------------------


def test_chat_rows_ask_for_the_number_and_the_answer_holds_the_record(tokenizer):
    sets = chat_sets(QUICK, tokenizer)
    plain = demo_sets(QUICK)
    stream = personal_records(QUICK.forget + QUICK.retain + QUICK.unseen, seed=QUICK.seed)
    records = {r["id"]: r for r in stream}
    for name in ("forget", "retain", "unseen"):
        assert [r["id"] for r in sets[name]] == [r["id"] for r in plain[name]], name  # the same people
        for row in sets[name]:
            assert set(row) == {"id", "messages"}
            (user, assistant) = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            fields = records[row["id"]]["fields"]
            assert user["content"] == CHAT_QUESTION.format(name=fields["name"])
            answer, text = assistant["content"], records[row["id"]]["text"]
            # The record's sentence, cut after a whole word: the longest such cut that still fits.
            assert answer and text.startswith(answer) and (answer == text or text[len(answer)] == " "), row["id"]
            _, response = by_hand_tokens(tokenizer, row["messages"])
            assert tokenizer.decode(response) == answer + "<|im_end|>\n"
            assert len(response) <= QUICK.max_length, row["id"]
            if answer != text:
                longer = text[: text.index(" ", len(answer) + 1)] if " " in text[len(answer) + 1 :] else text
                assert len(tokenizer(longer, add_special_tokens=False)["input_ids"]) + 2 > QUICK.max_length
    assert sets["holdout"] == plain["holdout"]
    assert CHAT_DIR in OWN_ENTRIES  # --overwrite removes it


# ---- the quick run with --chat on the real model -------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_chat") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_demo.py: two threads stall on each other in small decoding steps
    printed = io.StringIO()
    try:
        start = time.time()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["demo", "--quick", "--chat", "--methods", *METHODS, "--output_dir", str(out)])
        seconds = time.time() - start
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, json.loads((out / "report.json").read_text()), printed.getvalue(), seconds


@torch.no_grad()
def by_hand(model, prompt, response):
    """MA and loss of the answer from one plain forward pass of prompt + answer, counting only the
    positions that predict an answer token."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    scored = logits[len(prompt) - 1 : -1]
    targets = torch.tensor(response)
    nll = -torch.log_softmax(scored, -1).gather(-1, targets[:, None])[:, 0]
    return {"ma": float((scored.argmax(-1) == targets).float().mean()), "loss": float(nll.mean())}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_chat_form_is_planted_unlearned_and_audited_on_the_answer_only(chat_run, tokenizer):
    from transformers import AutoModelForCausalLM

    out, report, _, seconds = chat_run
    chat_dir = out / CHAT_DIR
    rows = {name: read_jsonl(chat_dir / "data" / f"{name}.jsonl") for name in ("forget", "retain", "unseen")}
    assert rows["forget"] == chat_sets(QUICK, tokenizer)["forget"]  # the messages rows, as built
    tokens = {r["id"]: by_hand_tokens(tokenizer, r["messages"]) for name in rows for r in rows[name]}

    def assert_answer_only(scored, where):
        assert scored, where
        for row in scored:
            prompt, response = tokens[row["id"]]
            assert row["n_prompt_tokens"] == len(prompt) and row["n_tokens"] == len(response), (where, row["id"])

    # The planted model's figures are a plain forward pass's over the answer tokens.
    planted = AutoModelForCausalLM.from_pretrained(chat_dir / "planted" / "model", dtype=torch.float32).eval()
    for name in ("forget", "retain", "unseen"):
        scored = read_jsonl(chat_dir / "planted" / f"scores_{name}.jsonl")
        assert [r["id"] for r in scored] == [r["id"] for r in rows[name]]
        assert_answer_only(scored, f"planted {name}")
        for row in scored:
            want = by_hand(planted, *tokens[row["id"]])
            assert row["ma"] == pytest.approx(want["ma"], abs=1e-6), row["id"]
            assert row["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-4), row["id"]
    del planted
    chat = report["chat"]
    # Planted like the plain records: fine-tuning raised the answers' MA (the quick run's 5 epochs
    # need not reach the extractability criterion; the report says whether it did).
    history = chat["planting"]["history"]
    assert history[0]["epoch"] == 0 and history[-1]["ma_mean"] > history[0]["ma_mean"] + 0.3, history
    assert chat["planting"]["epochs"] == len(history) - 1 >= 1
    assert chat["planting"]["records"] == QUICK.forget + QUICK.retain
    assert chat["planting"]["retrained"]["records"] == QUICK.retain
    assert chat["tokens"]["forget"]["response_max"] == max(len(tokens[r["id"]][1]) for r in rows["forget"])
    # The audits, the planted one (every method's "before") and each method's, on the answers only.
    for audit_file in ("planted/audit.jsonl", "retrained/audit.jsonl", *(f"{m}/audit_after.jsonl" for m in METHODS)):
        audited = read_jsonl(chat_dir / audit_file)
        assert [r["id"] for r in audited] == [r["id"] for r in rows["forget"] + rows["unseen"]], audit_file
        assert_answer_only(audited, audit_file)

    # Every method ran on the chats with the plain demo's settings and verdict rule.
    assert list(chat["methods"]) == list(report["methods"]) == list(METHODS)
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Chat form\n", 1)[1].split("\n## ", 1)[0]
    assert ("criterion reached" if chat["planting"]["reached"] else "criterion NOT reached") in section
    for method in METHODS:
        own = json.loads((chat_dir / method / "report.json").read_text())
        summary = chat["methods"][method]
        assert own["settings"]["stop_rule"] == report["methods"][method]["stop_rule"]
        assert summary["thresholds"] == own["thresholds"] == chat["planting"]["thresholds"]["unseen"]
        for when in ("before", "after"):
            scored = read_jsonl(chat_dir / method / f"scores_{when}.jsonl")
            assert [r["id"] for r in scored] == [r["id"] for r in rows["forget"]]
            assert_answer_only(scored, f"{method} {when}")
            assert summary[when] == own[when] and summary["ma"][when] == [r["ma"] for r in scored]
        b, a = summary["before"], summary["after"]
        # The chat table: one row per method, the run's own numbers.
        row = f"| {TITLES[method]} | {b['memorized']} → {a['memorized']} of {b['count']} |"
        assert row in section, (method, section)
        assert f"{b['means']['ma']:.3f} → {a['means']['ma']:.3f}" in section
        assert (chat_dir / method / "model" / "model.safetensors").is_file()
    assert b["count"] == QUICK.forget
    assert {"chat plant", "chat plant retrained", "chat audit planted", "chat unlearn ga"} <= set(report["timing"])
    print(f"quick demo with --chat: {seconds:.0f} s; stages: {report['timing']}")


@pytest.mark.slow
def test_chat_form_writes_no_record_text_outside_the_data_files(chat_run):
    out, _, printed, _ = chat_run
    stream = personal_records(QUICK.forget + QUICK.retain, seed=QUICK.seed)
    secrets = [r["fields"][key].encode() for r in stream for key in ("name", "phone", "email", "ssn")]
    checked = 0
    for path in out.rglob("*"):
        parts = path.relative_to(out).parts
        if not path.is_file() or parts[0] == "data" or parts[:2] == (CHAT_DIR, "data") or path.suffix == ".safetensors":
            continue
        checked += 1
        content = path.read_bytes()
        assert not [s for s in secrets if s in content], f"{path.relative_to(out)} holds record text"
    assert checked > 20
    assert not [s for s in secrets if s in printed.encode()]
    assert "chat form: GA (baseline)" in printed and "chat form: TAU" in printed
