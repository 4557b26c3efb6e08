"""The scorer on tiny memorized models: fast equals the per-prefix reference, padding never
counts, and the values mean what they should."""

import gc
import weakref

import pytest
import torch

from ds_unlearn import score_sequences
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.passes import greedy_continuations
from ds_unlearn.core.toy import random_sequences, tiny_model

from .conftest import VOCAB

EL_N = (2, 3, 5, 10)
K = (4, 8)


def _all(token_sets):
    return [s for name in ("memorized", "partial", "unseen", "repetitive") for s in token_sets[name]]


def test_fast_equals_reference_in_float64(memorized_model, token_sets):
    seqs = _all(token_sets)
    fast = score_sequences(memorized_model, seqs, el_n=EL_N, extract_k=K, batch_size=3)
    ref = score_sequences(memorized_model, seqs, el_n=EL_N, extract_k=K, batch_size=3, method="reference")
    assert len(fast) == len(ref) == len(seqs)
    for a, b in zip(fast, ref):
        assert list(a) == list(b)
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-12), key
    # The sets really cover memorized, partly memorized and unseen behaviour.
    n_mem = len(token_sets["memorized"])
    assert all(r["ma"] == 1.0 and r["el_10"] == 1.0 and r["extractable_k8"] for r in fast[:n_mem])
    partial = fast[n_mem : n_mem + len(token_sets["partial"])]
    assert any(0.0 < r["el_10"] < 1.0 for r in partial)
    assert all(r["ma"] < 1.0 and r["max_verbatim"] >= 10 for r in partial)
    unseen = fast[n_mem + len(partial) : n_mem + len(partial) + len(token_sets["unseen"])]
    assert all(r["ma"] < 0.3 and r["el_10"] < 0.1 for r in unseen)


def test_mixed_lengths_padding_and_batching_do_not_change_values(memorized_model, token_sets):
    seqs = _all(token_sets)
    together = score_sequences(memorized_model, seqs, el_n=(5,), extract_k=(4,), batch_size=16)
    one_by_one = [score_sequences(memorized_model, [s], el_n=(5,), extract_k=(4,))[0] for s in seqs]
    for a, b in zip(together, one_by_one):
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-12), key
    assert [r["n_tokens"] for r in together] == [len(s) for s in seqs]


def test_ma_and_loss_match_a_plain_forward(memorized_model, token_sets):
    seq = token_sets["partial"][1]
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = memorized_model(input_ids=ids).logits[0, :-1]
    expected_loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    expected_ma = (logits.argmax(-1) == ids[0, 1:]).double().mean().item()
    row = score_sequences(memorized_model, [seq], el_n=(10,), extract_k=(8,))[0]
    assert row["loss"] == pytest.approx(expected_loss, abs=1e-10)
    assert row["ma"] == pytest.approx(expected_ma)


def test_greedy_continuations_match_step_by_step_decoding(memorized_model, token_sets):
    prompts = [token_sets["unseen"][0][:7], token_sets["memorized"][1][:3], token_sets["partial"][0][:12]]
    lengths = [5, 9, 2]
    batched = greedy_continuations(memorized_model, prompts, lengths)
    for prompt, n, got in zip(prompts, lengths, batched):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(memorized_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert got == seq[len(prompt) :]


def test_model_dtype_device_and_mode_are_kept(token_sets):
    model = tiny_model("llama", vocab_size=64).to(torch.bfloat16).train()
    rows = score_sequences(model, token_sets["unseen"], el_n=(5,), extract_k=(4,))
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training
    assert all(0.0 <= r["ma"] <= 1.0 and r["loss"] > 0 for r in rows)


@pytest.mark.parametrize(
    "sequences, kwargs, message",
    [
        ([], {}, "empty"),
        ([[1] * 40, [1] * 9], {"el_n": (10,), "extract_k": (4,)}, "row 1: 9 tokens"),
        ([[1] * 40], {"extract_k": (40,)}, "row 0: 40 tokens"),
        ([[1] * 20 + [64] + [1] * 20], {}, "token id 64 is outside the vocabulary"),
        ([[1] * 40], {"method": "slow"}, "method must be one of"),
        (["tokens as text, not ids: " * 3], {}, r"row 0 is text, not token ids: tokenize it first"),
        ("one string", {}, "got one string: tokenize text first"),
        ([[1] * 20 + [1.5] + [1] * 20], {}, "row 0: 1.5 is not an integer token id"),
        (torch.ones(2, 3, 40, dtype=torch.long), {}, r"must be 2-D \[rows, tokens\], got shape \(2, 3, 40\)"),
        ([[1] * 257], {}, "257 tokens, longer than the model.s context of 256 positions .cut rows to at most 256"),
        ([[1] * 40], {"el_n": "10"}, "el_n must be an int or several ints, got '10'"),  # not el_1 and el_0
        ([[1] * 40], {"el_n": True}, "el_n must be an int or several ints, got True"),
        ([[1] * 40], {"extract_k": (4.0,)}, r"extract_k must be an int or several ints, got \(4.0,\)"),
    ],
)
def test_bad_requests_fail_before_compute(memorized_model, sequences, kwargs, message):
    with pytest.raises(InputError, match=message):
        score_sequences(memorized_model, sequences, **kwargs)


def test_a_2d_tensor_and_bare_ints_score_like_lists(memorized_model, token_sets):
    seqs = [s[:25] for s in token_sets["memorized"] + token_sets["unseen"]]
    as_lists = score_sequences(memorized_model, seqs, el_n=(5,), extract_k=(4,))
    assert score_sequences(memorized_model, torch.tensor(seqs), el_n=5, extract_k=4) == as_lists


# -- sequences as long as the model's context --------------------------------------------------
CONTEXT = 64


@pytest.fixture(scope="module")
def full_context_case():
    """A float64 GPT-Neo with 64 learned positions that memorized one 64-token sequence, and rows of
    64, 63 and 48 tokens (memorized, partly memorized, unseen) scored together."""
    from ds_unlearn.core.toy import memorize

    torch.manual_seed(0)
    model = tiny_model("gpt_neo", seed=3, vocab_size=64, max_positions=CONTEXT)
    known = random_sequences(1, CONTEXT, 64, seed=31)[0]
    memorize(model, [known], steps=60)
    unseen = random_sequences(3, [CONTEXT, CONTEXT - 1, 48], 64, seed=32)
    partial = known[:30] + [1 + known[30] % 63] + known[31:]
    return model.double().eval(), [known, partial, *unseen]


def test_sequences_as_long_as_the_context_score_like_the_reference(full_context_case):
    model, seqs = full_context_case
    ref = score_sequences(model, seqs, el_n=(5, 10), extract_k=(8,), batch_size=4, method="reference")
    fast = score_sequences(model, seqs, el_n=(5, 10), extract_k=(8,), batch_size=4)
    assert fast == ref
    assert ref[0]["el_10"] == 1.0 and 0.0 < ref[1]["el_10"] < 1.0


def test_the_plain_decoding_fallback_stays_inside_the_context(full_context_case, monkeypatch):
    # Models whose KV cache the draft-and-verify decoder cannot copy (sliding windows, recurrent
    # layers) decode chunks plainly; a chunk must never mix a long prompt with a long request.
    import ds_unlearn.core.scorer as scorer

    model, seqs = full_context_case
    monkeypatch.setattr(scorer, "supports", lambda cache: False)
    fast = score_sequences(model, seqs, el_n=(5, 10), extract_k=(8,), batch_size=16)
    ref = score_sequences(model, seqs, el_n=(5, 10), extract_k=(8,), batch_size=16, method="reference")
    assert fast == ref


def test_the_ready_4d_mask_gives_the_logits_of_transformers_own_mask(memorized_model, token_sets, monkeypatch):
    # The decoder hands eager/SDPA attention a 4D additive mask it builds itself; every forward's
    # logits must be bit-identical to those of the 2D mask that transformers expands.
    import ds_unlearn.core.continuations as continuations

    seqs = token_sets["partial"] + token_sets["unseen"]
    assert memorized_model.config._attn_implementation in ("eager", "sdpa")

    def logits_of_every_forward(additive: bool) -> list[torch.Tensor]:
        init = continuations.ContinuationBatch.__init__

        def patched(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if not additive:
                self.additive_mask_dtype = None

        monkeypatch.setattr(continuations.ContinuationBatch, "__init__", patched)
        seen = []
        hook = memorized_model.register_forward_hook(lambda mod, args, out: seen.append(out.logits.clone()))
        try:
            score_sequences(memorized_model, seqs, el_n=(5,), extract_k=(4,), batch_size=4)
        finally:
            hook.remove()
        return seen

    ready, expanded = logits_of_every_forward(True), logits_of_every_forward(False)
    assert len(ready) == len(expanded) > 5
    assert all(torch.equal(a, b) for a, b in zip(ready, expanded))


def test_a_sequence_longer_than_the_context_is_an_input_error(full_context_case):
    model, seqs = full_context_case
    with pytest.raises(InputError, match="row 1: 65 tokens, longer than the model's context of 64 positions"):
        score_sequences(model, [seqs[0], seqs[0] + [5]], el_n=(10,), extract_k=(8,))


# -- work, memory and failure modes -------------------------------------------------------------
def test_memorized_text_needs_no_generation(memorized_model, token_sets, monkeypatch):
    import ds_unlearn.core.continuations as continuations

    steps = []
    monkeypatch.setattr(continuations.ContinuationBatch, "step", lambda self: steps.append(1))
    rows = score_sequences(memorized_model, token_sets["memorized"], el_n=(10,), extract_k=(8,))
    assert steps == [] and all(r["el_10"] == 1.0 for r in rows)


def test_non_finite_logits_name_the_rows(token_sets):
    from ds_unlearn.core.errors import NonFiniteLogitsError

    model = tiny_model("llama", vocab_size=64).eval()
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"rows \[0, 1\].*non-finite weights"):
        score_sequences(model, token_sets["unseen"][:2], el_n=(5,), extract_k=(4,))


def test_batch_size_auto_is_sized_from_free_memory():
    from ds_unlearn.core.scorer import BatchSizes, resolve_batch_size

    model = tiny_model("gpt_neo", vocab_size=512, max_positions=512)
    # KV: 2 layers x (k, v) x 32 x 4 bytes = 512 B per token; a row: 265 tokens of KV + 2 x 65 x 512
    # fp32 logits = 401,920 B. A 1 GiB budget (a quarter of 4 GiB) holds 2,671 rows.
    sizes = resolve_batch_size(model, "auto", 200, free_bytes=4 << 30)
    assert sizes == BatchSizes(sequences=13, rows=2671)
    assert resolve_batch_size(model, None, 200, free_bytes=64 << 30).rows == 4096  # the CPU cap
    assert resolve_batch_size(model, 7, 200) == BatchSizes(7, 7)
    with pytest.raises(InputError, match="batch_size must be a positive integer or 'auto'"):
        resolve_batch_size(model, 0, 200)


def test_scoring_builds_no_autograd_graph_and_keeps_no_weight_alive():
    # Continuations write into a preallocated KV cache in place; with grad enabled those writes
    # made autograd graphs whose reference cycles kept every weight alive after the model was
    # gone (the demo's process grew by a model per unlearning run until the OOM killer came).
    model = tiny_model("llama", seed=3, vocab_size=VOCAB)
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    # Unseen text of one length: many wrong positions, so many draft-and-verify continuations.
    scores = score_sequences(model, random_sequences(6, 40, VOCAB, seed=12), el_n=(4,), extract_k=(8,))
    assert len(scores) == 6 and all(0.0 <= r["el_4"] <= 1.0 for r in scores)
    gc.collect()
    assert not [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    weights = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert all(ref() is None for ref in weights)
