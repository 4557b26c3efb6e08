"""Batched model passes the scorer needs: one teacher-forced pass, and greedy continuations.

Both take a fixed number of forward calls decided by the caller, so that ranks under ZeRO-3 (where
every forward gathers parameters collectively) stay in lockstep even when their work differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAD_ID = 0  # any valid id: padded positions are masked out and never scored


def model_device(model) -> torch.device:
    # Under ZeRO-3 parameters are empty outside a gather, but they still live on the right device.
    return next(model.parameters()).device


def _score_dtype(logits: torch.Tensor) -> torch.dtype:
    # Half-precision log-softmax over a large vocabulary loses too much; float64 stays float64.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@dataclass
class TeacherForced:
    """One teacher-forced pass over a batch of S sequences (right-padded to width W).

    ``rows[i]``: (match, nll) of sequence i, both of length T_i - 1 (bool, float64).
    ``predictions``: int64 [S, W-1], the argmax after each prefix (``predictions[i, j]`` is the
    greedy token after ``x[:j+1]``; past T_i - 1 it is padding's). ``tokens``: int64 [S, W].
    ``cache``: the pass's KV cache when asked for (positions 0..T_i-1 of row i in columns
    0..T_i-1), else None. ``nonfinite``: indices of sequences whose logits held NaN or inf.
    ``moments``: when asked for, per sequence (mu, sigma), float64 rows of length T_i - 1: mean and
    standard deviation of log p(.) under the model's own next-token distribution (Min-K%++'s
    normalisers), from the same fp32 log-softmax; else None.
    """

    rows: list[tuple[np.ndarray, np.ndarray]]
    predictions: np.ndarray
    tokens: np.ndarray
    cache: object | None
    nonfinite: list[int]
    moments: list[tuple[np.ndarray, np.ndarray]] | None = None


@torch.no_grad()
def teacher_forced_pass(
    model, sequences: Sequence[Sequence[int]], keep_cache: bool = False, moments: bool = False
) -> TeacherForced:
    """One right-padded forward pass over ``sequences`` (see ``TeacherForced``); ``moments`` adds
    the per-position mean and spread of log p that Min-K%++ needs (one more pass over the logits)."""
    device = model_device(model)
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    tokens = ids.numpy()
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=keep_cache)
    logits = out.logits[:, :-1]
    logprobs = torch.log_softmax(logits.to(_score_dtype(logits)), dim=-1)
    targets = ids[:, 1:]
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    best, predictions = logits.max(-1)
    # Non-finite logits make every metric meaningless; checked once per pass, with the results.
    bad = (~torch.isfinite(best) & (mask[:, 1:] > 0)).any(-1)
    match = predictions == targets
    match, nll, predictions, bad = match.cpu().numpy(), nll.double().cpu().numpy(), predictions.cpu().numpy(), bad.cpu()
    rows = [(match[i, : n - 1].copy(), nll[i, : n - 1].copy()) for i, n in enumerate(lengths)]
    cache = out.past_key_values if keep_cache else None
    spread = None
    if moments:
        mu, sigma = (m.double().cpu().numpy() for m in logprob_moments(logprobs))
        spread = [(mu[i, : n - 1].copy(), sigma[i, : n - 1].copy()) for i, n in enumerate(lengths)]
    bad_rows = [int(i) for i in np.flatnonzero(bad.numpy())]
    return TeacherForced(rows, predictions, tokens, cache, bad_rows, spread)


def logprob_moments(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of log p(.) under p itself, over the last (vocabulary) axis of
    ``logprobs`` (a log-softmax, [..., V]); both [...], in its dtype (Zhang et al. 2024, Min-K%++)."""
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
    return mu, sigma


def teacher_forced_rows(model, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One right-padded forward pass over ``sequences``; per sequence the match row and the
    next-token NLL row, both of length T-1 (padding never counts)."""
    return teacher_forced_pass(model, sequences).rows


@torch.no_grad()
def greedy_continuations(
    model,
    prompts: Sequence[Sequence[int]],
    num_new: Sequence[int],
    forward_calls: int | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, ``num_new[i]`` tokens long, batched with a KV cache.

    Prompts are left-padded; the attention mask hides the padding and position ids count real
    tokens only, so each row sees exactly what it would see alone. Runs ``forward_calls`` forward
    passes (default ``max(num_new)``), one per generated token; EOS is not special.
    """
    device = model_device(model)
    steps = max(num_new) if forward_calls is None else forward_calls
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    next_token = out.logits[:, -1].argmax(-1)
    generated = [next_token]
    positions = positions[:, -1:]
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions + 1
        out = model(
            input_ids=next_token[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1)
        generated.append(next_token)
    tokens = torch.stack(generated, dim=1).cpu().tolist()
    return [row[:n] for row, n in zip(tokens, num_new)]


def decoding_processors(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> list:
    """The logits warpers ``model.generate(do_sample=True, ...)`` applies, in its order
    (temperature, then top-k, then top-p); an unset or neutral setting adds none."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


@torch.no_grad()
def token_statistics(
    model,
    sequences: Sequence[Sequence[int]],
    processors: Sequence = (),
) -> list[dict[str, np.ndarray]]:
    """One right-padded teacher-forced pass; per sequence four float64 rows of length T-1, one
    entry per predicted token x_t (t = 1..T-1; padding never counts):

    - ``logp``: log p(x_t | x_<t) under the model (nats);
    - ``mu``, ``sigma``: mean and standard deviation of log p(.) under p(. | x_<t) itself
      (Min-K%++'s normalisers);
    - ``logq``: log q(x_t | x_<t) under the decoding distribution, the logits passed through
      ``processors`` (``decoding_processors``) and renormalised; ``-inf`` outside the kept set.
    """
    device = model_device(model)
    lengths = [len(s) for s in sequences]
    ids = torch.full((len(sequences), max(lengths)), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logits = logits.to(_score_dtype(logits))
    targets = ids[:, 1:].unsqueeze(-1)
    logprobs = torch.log_softmax(logits, dim=-1)
    mu, sigma = logprob_moments(logprobs)
    batch, width, vocab = logits.shape
    warped = logits.reshape(batch * width, vocab)
    for processor in processors:  # they take (input_ids, scores[batch, vocab]); none reads input_ids
        warped = processor(None, warped)
    logq = torch.log_softmax(warped.reshape(batch, width, vocab), dim=-1)
    rows = {
        "logp": logprobs.gather(-1, targets).squeeze(-1),
        "mu": mu,
        "sigma": sigma,
        "logq": logq.gather(-1, targets).squeeze(-1),
    }
    rows = {k: v.double().cpu().numpy() for k, v in rows.items()}
    return [{k: v[i, : n - 1].copy() for k, v in rows.items()} for i, n in enumerate(lengths)]
