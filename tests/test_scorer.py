"""The scorer on tiny memorized models: fast equals the per-prefix reference, padding never
counts, and the values mean what they should."""

import pytest
import torch

from ds_unlearn import score_sequences
from ds_unlearn.core.errors import InputError
from ds_unlearn.core.passes import greedy_continuations

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
    from ds_unlearn.core.toy import tiny_model

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
    ],
)
def test_bad_requests_fail_before_compute(memorized_model, sequences, kwargs, message):
    with pytest.raises(InputError, match=message):
        score_sequences(memorized_model, sequences, **kwargs)
