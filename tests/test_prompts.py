"""Prompt/response rows: the prompt conditions every prediction but is never scored.

Every figure is checked against an independent computation that masks the prompt by hand: one
plain forward pass (no cache, no batching) for MA / loss / longest run / the membership scores,
and token-by-token greedy decoding without a KV cache for k-extractability and EL_n.
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_unlearn import score_sequences
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.toy import memorize, tiny_model

VOCAB, CONTEXT = 29, 40
_MODELS: dict = {}


def _model(arch: str = "llama", seed: int = 0, trained: tuple = ()):
    key = (arch, seed, trained)
    if key not in _MODELS:
        model = tiny_model(arch, seed=seed, vocab_size=VOCAB, max_positions=CONTEXT)
        if trained:
            memorize(model, [list(s) for s in trained], steps=25, lr=3e-2)
        _MODELS[key] = model.double().eval()
    return _MODELS[key]


@torch.no_grad()
def _greedy(model, prefix: list[int], steps: int) -> list[int]:
    out = list(prefix)
    for _ in range(steps):
        out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prefix) :]


def _overlap(a, b, n):
    grams = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    return sum(tuple(a[i : i + n]) in grams for i in range(len(a) - n + 1)) / (len(a) - n + 1)


@torch.no_grad()
def by_hand(model, seq: list[int], prompt: int, n: int, k: int) -> dict:
    """The response's figures from a plain forward pass masked by hand (targets x[P..T-1])."""
    logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    first = max(prompt, 1)  # the first target token
    targets = torch.tensor(seq[first:])
    nll = -logp[first - 1 : -1].gather(-1, targets[:, None])[:, 0]
    match = (logits[first - 1 : -1].argmax(-1) == targets).tolist()
    best = run = 0
    for hit in match:
        run = run + 1 if hit else 0
        best = max(best, run)
    cut = prompt + k  # Carlini's prefix: the prompt and the first K response tokens
    T = len(seq)
    el = np.mean([_overlap(_greedy(model, seq[:p], T - p), seq[p:], n) for p in range(first, T - n + 1)])
    return {
        "n_tokens": T - prompt,
        "loss": float(nll.mean()),
        "ma": float(np.mean(match)),
        f"el_{n}": float(el),
        "max_verbatim": best,
        f"extractable_k{k}": _greedy(model, seq[:cut], T - cut) == seq[cut:],
    }


def _rows(seed, lengths, prompts):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (t,), generator=gen).tolist() for t in lengths], list(prompts)


def test_scores_of_prompted_rows_equal_a_forward_pass_masked_by_hand():
    trained = tuple(tuple(s) for s in _rows(5, [30], [0])[0])
    model = _model("llama", 1, trained)
    seqs, prompts = _rows(2, [30, 24, 12, 30], [7, 1, 6, 0])
    seqs[3] = list(trained[0])  # a memorized row with no prompt, next to prompted ones
    seqs[0][:20] = trained[0][:20]  # a prompt inside memorized text: the response partly follows it
    got = score_sequences(model, seqs, el_n=(3,), extract_k=(2,), batch_size=3, prompt_lengths=prompts)
    for row, seq, prompt in zip(got, seqs, prompts):
        want = by_hand(model, seq, prompt, 3, 2)
        assert row["n_prompt_tokens"] == prompt
        for key, value in want.items():
            assert row[key] == pytest.approx(value, abs=1e-12), key
    assert got[0]["ma"] > 0.3  # the masked figures are not all zero: the test has teeth


def test_no_prompt_lengths_keeps_the_plain_output_and_zero_prompts_equal_it():
    model = _model("gpt_neo", 0)
    seqs, _ = _rows(3, [16, 20], [0, 0])
    plain = score_sequences(model, seqs, el_n=(2,), extract_k=(3,))
    zero = score_sequences(model, seqs, el_n=(2,), extract_k=(3,), prompt_lengths=[0, 0])
    assert "n_prompt_tokens" not in plain[0]
    assert [{k: v for k, v in r.items() if k != "n_prompt_tokens"} for r in zero] == plain


def test_membership_scores_cover_the_response_only():
    from ds_unlearn.core.mia import mia_scores, token_bytes
    from ds_unlearn.core.passes import token_statistics

    model = _model("llama", 2)
    seqs, prompts = _rows(4, [18, 15], [9, 4])
    got = score_sequences(model, seqs, el_n=(), extract_k=(1,), membership=True, prompt_lengths=prompts)
    for row, seq, prompt in zip(got, seqs, prompts):
        stats = token_statistics(model, [seq])[0]
        cut = prompt - 1  # stats row t predicts x[t+1]
        want = mia_scores(stats["logp"][cut:], stats["mu"][cut:], stats["sigma"][cut:], token_bytes(seq[prompt:]))
        for key in ("zlib", "min_k", "min_k++"):
            assert row[key] == pytest.approx(want[key], abs=1e-12)


def test_a_response_too_short_for_the_metrics_is_refused_naming_the_row():
    model = _model("llama", 0)
    seqs, _ = _rows(1, [12, 12], [0, 0])
    with pytest.raises(InputError, match=r"row 1: its prompt of 9 tokens leaves 3 response tokens.*need at least 4"):
        score_sequences(model, seqs, el_n=(4,), extract_k=(1,), prompt_lengths=[2, 9])
    with pytest.raises(InputError, match="prompt_lengths has 1 entries for 2 sequences"):
        score_sequences(model, seqs, el_n=(1,), extract_k=(1,), prompt_lengths=[2])


@st.composite
def prompted_cases(draw):
    arch = draw(st.sampled_from(["gpt_neo", "llama"]))
    n = draw(st.sampled_from([1, 2, 4]))
    seq = lambda length: draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
    trained = tuple(tuple(seq(CONTEXT)) for _ in range(draw(st.integers(0, 1))))
    rows, prompts = [], []
    for _ in range(draw(st.integers(1, 4))):
        prompt = draw(st.integers(0, CONTEXT - n - 1))
        # EL_n needs n tokens after the first prefix; extract_k=1 one token after prompt + 1 (min_length).
        length = draw(st.integers(max(max(prompt, 1) + n, prompt + 2), CONTEXT))
        if trained and draw(st.booleans()):  # part of the trained text, one token changed
            row = list(trained[0][:length])
            row[draw(st.integers(0, length - 1))] = draw(st.integers(0, VOCAB - 1))
        else:
            row = seq(length)
        rows.append(row)
        prompts.append(prompt)
    return arch, draw(st.integers(0, 2)), n, trained, rows, prompts, draw(st.sampled_from([1, 3, 64]))


@pytest.mark.timeout(600)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompted_cases())
def test_fast_equals_reference_with_prompts_of_random_lengths(case):
    """The fast EL_n (continuations only from wrong positions after the prompt, from the shared
    KV cache) equals the per-prefix reference exactly, and MA equals a plain masked forward pass."""
    arch, seed, n, trained, rows, prompts, batch = case
    torch.set_num_threads(1)
    model = _model(arch, seed, trained)
    kwargs = dict(el_n=(n,), extract_k=(1,), batch_size=batch, prompt_lengths=prompts)
    fast = score_sequences(model, rows, **kwargs)
    assert fast == score_sequences(model, rows, method="reference", **kwargs)
    for row, seq, prompt in zip(fast, rows, prompts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
        first = max(prompt, 1)
        hits = (logits[first - 1 : -1].argmax(-1) == torch.tensor(seq[first:])).double().mean()
        assert math.isclose(row["ma"], float(hits), abs_tol=1e-12)


# ---- the data layer: prompt fields, prompt_ids, chat templates, mixing, bad input ------------------

CHAT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}t2 {{ m['content'] }} t3 "
    "{% else %}t1 {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}t2 {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over ids 0..63 ("t5 t9" -> [5, 9]) with a small chat template:
    user turns "t1 ...", assistant turns "t2 ... t3", generation prompt "t2"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    out.chat_template = CHAT
    return out


def _words(ids):
    return " ".join(f"t{i}" for i in ids)


def _error(rows, tokenizer, **options) -> str:
    from ds_unlearn.core.data import to_sequence_set

    with pytest.raises(InputError) as caught:
        to_sequence_set(rows, tokenizer=tokenizer, vocab_size=64, **options)
    assert "\n" not in str(caught.value) and "t45" not in str(caught.value)  # one line, never the text
    return str(caught.value)


def test_prompt_fields_prompt_ids_and_chat_rows_become_prompt_lengths(tokenizer):
    from ds_unlearn.core.data import to_sequence_set

    tofu = [{"question": "t4 t5 t6", "answer": "t7 t8"}, {"question": "t9", "answer": "t10 t11 t12"}]
    data = to_sequence_set(tofu, tokenizer=tokenizer, prompt_field="question", text_field="answer")
    assert data.sequences == [[4, 5, 6, 7, 8], [9, 10, 11, 12]] and data.prompt_lengths == [3, 1]
    ids = to_sequence_set([{"prompt_ids": [1, 2], "input_ids": [3, 4, 5]}])
    assert ids.sequences == [[1, 2, 3, 4, 5]] and ids.prompt_lengths == [2]
    plain = to_sequence_set([{"text": "t4 t5"}], tokenizer=tokenizer)
    assert plain.prompt_lengths is None and plain.prompts() == [0]
    chat = [
        {"id": "c", "messages": [{"role": "user", "content": "t4 t5"}, {"role": "assistant", "content": "t6"}]},
        {
            "id": "d",
            "messages": [
                {"role": "user", "content": "t7"},
                {"role": "assistant", "content": "t8 t9"},
                {"role": "user", "content": "t10"},
                {"role": "assistant", "content": "t11"},
            ],
        },
    ]
    last = to_sequence_set(chat, tokenizer=tokenizer, chat_template=True)
    # The generation prompt (t2) is prompt; the turn and its end token (t3) are the response.
    assert last.sequences == [[1, 4, 5, 2, 6, 3], [1, 7, 2, 8, 9, 3, 1, 10, 2, 11, 3]]
    assert last.prompt_lengths == [4, 9] and last.ids == ["c", "d"]
    every = to_sequence_set(chat, tokenizer=tokenizer, chat_template=True, score_turns="all")
    assert every.ids == ["c/1", "d/1", "d/3"]
    assert every.sequences[1] == [1, 7, 2, 8, 9, 3] and every.prompt_lengths == [4, 3, 9]
    cut = to_sequence_set(tofu, tokenizer=tokenizer, prompt_field="question", text_field="answer", max_length=4)
    assert cut.sequences == [[4, 5, 6, 7], [9, 10, 11, 12]]


def test_bad_prompt_input_is_one_line_naming_the_row(tokenizer):
    qa = {"prompt": "t4 t5", "text": "t45 t6"}
    not_text = [qa, {"prompt": 3, "text": "t1"}]
    assert "row 1: prompt field 'prompt' is an integer, not a string" in _error(not_text, tokenizer)
    assert "row 1: has no prompt but row 0 has one" in _error([qa, {"text": "t45"}], tokenizer)
    assert "row 1: has a prompt but row 0 has none" in _error([{"text": "t45"}, qa], tokenizer)
    from ds_unlearn.core.data import to_sequence_set

    mixed = to_sequence_set([qa, {"text": "t45 t7"}], tokenizer=tokenizer, mixed_prompts=True)
    assert mixed.prompt_lengths == [2, 0]
    assert "row 0: its prompt of 2 tokens leaves no response token within max_length 2" in _error(
        [qa], tokenizer, max_length=2
    )
    empty = [{"prompt": "t4 t5", "text": ""}]
    assert "row 0: its prompt of 2 tokens leaves no response token" in _error(empty, tokenizer)
    no_reply = [{"messages": [{"role": "user", "content": "t45"}]}]
    assert "row 0: 'messages' has no assistant turn" in _error(no_reply, tokenizer, chat_template=True)
    bad = [{"messages": [{"role": "user", "content": ["t45"]}, {"role": "assistant", "content": "t1"}]}]
    assert "row 0: message 0 has content an array, not a string" in _error(bad, tokenizer, chat_template=True)
    assert "pass chat_template" in _error(no_reply, tokenizer)
    untemplated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, unk_token="t0")
    assert "chat_template: the model's tokenizer has no chat template" in _error(
        no_reply, untemplated, chat_template=True
    )


def test_a_prompt_filling_the_context_is_refused():
    from ds_unlearn.core.data import SequenceSet, check_context

    with pytest.raises(InputError, match="row 0: its prompt of 8 tokens leaves no response token inside the model's"):
        check_context(SequenceSet([0], [list(range(1, 11))], prompt_lengths=[8]), 8)


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tokenizer, tmp_path_factory):
    """The memorizing tiny checkpoint with the word-level, chat-templated tokenizer beside it."""
    import shutil

    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(model_dir, out)
    tokenizer.save_pretrained(out)
    return out


def test_score_cli_on_question_answer_rows_equals_the_masked_scores(chat_model_dir, token_sets, tmp_path, capsys):
    from ds_unlearn.cli import main
    from ds_unlearn.core.files import read_jsonl
    from ds_unlearn.core.models import load_for_inference

    from .conftest import write_jsonl

    seqs = token_sets["memorized"][:2] + token_sets["unseen"][:1]
    cuts = [12, 5, 9]
    rows = [
        {"id": f"q{i}", "question": _words(s[:c]), "answer": _words(s[c:])} for i, (s, c) in enumerate(zip(seqs, cuts))
    ]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "s.jsonl"
    flags = ["--model", chat_model_dir, "--data", data, "--el_n", "4", "--extract_k", "3", "--prompt_field", "question"]
    assert main(["score", *map(str, flags), "--text_field", "answer", "--out", str(out)]) == 0
    got = read_jsonl(out)
    model = load_for_inference(chat_model_dir, torch.float32, None)
    want = score_sequences(model, seqs, el_n=(4,), extract_k=(3,), prompt_lengths=cuts)
    assert [r["id"] for r in got] == ["q0", "q1", "q2"]
    for row, expected in zip(got, want):
        assert row.keys() - {"id"} == expected.keys()
        assert all(row[k] == pytest.approx(v, abs=1e-6) for k, v in expected.items())
    assert [r["n_tokens"] for r in got] == [len(s) - c for s, c in zip(seqs, cuts)]
    bad = write_jsonl(tmp_path / "mixed.jsonl", [*rows, {"id": "x", "answer": "t4 t5 t6 t7 t8 t9"}])
    capsys.readouterr()
    out2 = tmp_path / "never.jsonl"
    assert main(["score", *map(str, flags), "--text_field", "answer", "--data", str(bad), "--out", str(out2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 3: has no prompt but row 0 has one" in err
    assert not out2.exists()


# ---- unlearning: every loss term covers the response only ------------------------------------------


def test_training_batches_mask_the_prompt_and_the_gradient_equals_a_hand_masked_loss():
    from ds_unlearn.unlearn.loop import SlotDataset, collate_sequences
    from ds_unlearn.unlearn.losses import per_sequence_kl, per_sequence_nll, row_losses, weighted_objective
    from ds_unlearn.unlearn.selection import Slot

    model = tiny_model("llama", seed=3, vocab_size=VOCAB, max_positions=CONTEXT).double()
    seqs, prompts = _rows(6, [14, 9], [5, 0])
    data = SlotDataset(seqs, prompts)
    batch = collate_sequences([data[Slot(0, 0.5, "ascend")], data[Slot(1, 0.5, "descend")]])
    assert batch["labels"][0, :5].eq(-100).all() and batch["labels"][0, 5:14].tolist() == seqs[0][5:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, ma = per_sequence_nll(logits, batch["labels"])
    loss = weighted_objective(row_losses(batch["term"], nll), batch["weight"])
    mine = torch.autograd.grad(loss, list(model.parameters()))

    hand = 0.0
    for seq, prompt, sign in ((seqs[0], 5, -1.0), (seqs[1], 0, 1.0)):
        out = model(input_ids=torch.tensor([seq])).logits[0]
        first = max(prompt, 1)
        logp = torch.log_softmax(out[first - 1 : -1], -1)
        hand = hand + 0.5 * sign * -logp.gather(-1, torch.tensor(seq[first:])[:, None]).mean()
    for a, b in zip(mine, torch.autograd.grad(hand, list(model.parameters()))):
        assert torch.allclose(a, b, atol=1e-12)
    scores = score_sequences(model.eval(), seqs, el_n=(), extract_k=(1,), prompt_lengths=prompts)
    assert ma.tolist() == pytest.approx([r["ma"] for r in scores], abs=1e-12)
    # KL over the response only: a reference that differs from the model only on prompt positions gives 0.
    ref = torch.log_softmax(logits[:, :-1].detach(), -1).clone()
    ref[0, :4] = torch.log_softmax(torch.randn_like(ref[0, :4]), -1)
    assert per_sequence_kl(logits, ref, batch["labels"]).abs().max() < 1e-6  # fp32 KL: rounding only


def test_npo_reference_counts_response_tokens_only():
    from ds_unlearn.core.scorer import scored_tokens

    model = _model("llama", 0)
    seqs, prompts = _rows(8, [16, 16], [6, 0])
    for row, seq, prompt in zip(
        score_sequences(model, seqs, el_n=(), extract_k=(1,), prompt_lengths=prompts), seqs, prompts
    ):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], -1)
        first = max(prompt, 1)
        hand = logp[first - 1 : -1].gather(-1, torch.tensor(seq[first:])[:, None]).sum()
        assert -row["loss"] * scored_tokens(row) == pytest.approx(float(hand), abs=1e-9)


PROMPT = 8  # the first 8 of each 24-token row become its prompt


@pytest.fixture(scope="module")
def prompted_case(unlearn_case, tmp_path_factory):
    """``unlearn_case`` with each row split into prompt_ids (8 tokens) and input_ids (16)."""
    from ds_unlearn.core.files import read_jsonl

    from .conftest import write_jsonl

    root = tmp_path_factory.mktemp("prompted")
    case = {"model": unlearn_case["model"]}
    for name in ("forget", "retain", "holdout"):
        rows = read_jsonl(unlearn_case[name])
        split = [
            {"id": r["id"], "prompt_ids": r["input_ids"][:PROMPT], "input_ids": r["input_ids"][PROMPT:]} for r in rows
        ]
        case[name] = write_jsonl(root / f"{name}.jsonl", split)
        case[f"{name}_full"] = [r["input_ids"] for r in rows]
    return case


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_unlearn_on_prompted_rows_judges_trains_and_audits_the_response(method, prompted_case, tmp_path):
    from ds_unlearn.cli import main
    from ds_unlearn.core.files import read_jsonl
    from ds_unlearn.core.models import load_causal_lm

    from .conftest import unlearn_args

    out = tmp_path / method
    assert main(["unlearn", *unlearn_args(prompted_case, out, "--method", method, "--num_train_epochs", "3")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guard"]["ok"], report["guard"]
    full, prompts = prompted_case["forget_full"], [PROMPT] * 4
    for name, model_dir in (("before", prompted_case["model"]), ("after", out / "model")):
        model = load_causal_lm(model_dir)
        want = score_sequences(model, full, el_n=(10,), extract_k=(8,), prompt_lengths=prompts)
        got = read_jsonl(out / f"scores_{name}.jsonl")
        for g, w in zip(got, want):
            assert g["n_tokens"] == 16 and g["n_prompt_tokens"] == PROMPT
            assert g["ma"] == pytest.approx(w["ma"]) and g["loss"] == pytest.approx(w["loss"], rel=1e-5)
            assert g["el_10"] == pytest.approx(w["el_10"])
    audit_rows = read_jsonl(out / "audit_after.jsonl")
    assert all(r["n_tokens"] == 16 and r["n_prompt_tokens"] == PROMPT for r in audit_rows)
    assert report["after"]["memorized"] < report["before"]["memorized"]
