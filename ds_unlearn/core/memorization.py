"""Per-sequence memorization metrics as pure functions (definitions and sources in docs/scoring.md).

Everything here works on plain Python / numpy data for ONE sequence: the token ids
``x[0..T-1]`` and the teacher-forced ``match`` row, ``match[j] = argmax p(.|x[:j+1]) == x[j+1]``.
No model, no torch: the scorer computes ``match`` and the greedy continuations and calls these.

The key fact behind the fast extraction likelihood: the greedy continuation of ``x[:p]`` equals
``x[p:]`` up to the first wrong prediction at or after ``p`` (index ``f`` in ``match``), and from
there on it depends only on ``f``. So one continuation per wrong position serves every prefix
length whose first error is that position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# A row with a prompt of P tokens (prompt/response data, chat templates) scores only its response
# x[P..T-1]: the prompt conditions every prediction but is never a target, never counted.

# Verdict thresholds of the ICML 2024 code, on memorization accuracy.
MEMORIZED_MA = 0.60
OVER_UNLEARNED_MA = 0.15


def scored_start(prompt_length: int) -> int:
    """Index in a ``match`` / NLL row (position j predicts x[j+1]) of the first scored position
    for a prompt of ``prompt_length`` tokens: P-1, or 0 without a prompt (x[0] is never a target,
    so a one-token prompt scores the same positions as none)."""
    return max(int(prompt_length) - 1, 0)


def first_prefix(prompt_length: int) -> int:
    """The shortest prefix EL_n continues from: the whole prompt (at least one token)."""
    return max(int(prompt_length), 1)


def memorization_accuracy(match: Sequence[bool]) -> float:
    """Mean of the teacher-forced match row."""
    return float(np.mean(np.asarray(match, dtype=bool)))


def longest_true_run(match: Sequence[bool]) -> int:
    """Longest run of consecutive True: the most tokens greedy decoding reproduces verbatim."""
    best = run = 0
    for hit in match:
        run = run + 1 if hit else 0
        best = max(best, run)
    return best


def is_extractable(match: Sequence[bool], k: int) -> bool:
    """Carlini et al.'s k-extractability: greedy decoding from x[:k] reproduces all of x[k:]."""
    return bool(np.all(np.asarray(match[k - 1 :], dtype=bool)))


def ngram_overlap(generated: Sequence[int], target: Sequence[int], n: int) -> float:
    """Fraction of the n-grams of ``generated`` that occur anywhere among the n-grams of ``target``."""
    target_grams = {tuple(target[i : i + n]) for i in range(len(target) - n + 1)}
    num_grams = len(generated) - n + 1
    hits = sum(tuple(generated[i : i + n]) in target_grams for i in range(num_grams))
    return hits / num_grams


def extraction_likelihood_reference(
    tokens: Sequence[int], continuations: Mapping[int, Sequence[int]], n: int, prompt_length: int = 0
) -> float:
    """EL_n by definition: ``continuations[p]`` is the greedy continuation of ``tokens[:p]``
    (exactly T-p tokens) for every p in a..T-n, a = ``first_prefix(prompt_length)``; the mean
    over those T-n-a+1 prefixes (a = 1 without a prompt: the papers' 1/(T-n))."""
    T, start = len(tokens), first_prefix(prompt_length)
    total = sum(ngram_overlap(continuations[p], tokens[p:], n) for p in range(start, T - n + 1))
    return total / (T - n - start + 1)


def first_errors(match: Sequence[bool]) -> np.ndarray:
    """``out[j]`` = smallest f >= j with ``match[f]`` False, or -1 when every later match holds."""
    out = np.full(len(match), -1, dtype=np.int64)
    nxt = -1
    for j in range(len(match) - 1, -1, -1):
        if not match[j]:
            nxt = j
        out[j] = nxt
    return out


def continuation_starts(match: Sequence[bool], max_prefix: int, min_prefix: int = 1) -> list[int]:
    """Wrong positions f whose greedy continuation (of ``x[:f+1]``) some prefix length
    p in min_prefix..max_prefix needs: exactly the distinct first errors at or after p-1 (with a
    prompt of P tokens, min_prefix = P: no continuation starts inside the prompt)."""
    if max_prefix < min_prefix:
        return []
    errs = first_errors(match)[min_prefix - 1 : max_prefix]
    return sorted({int(f) for f in errs if f >= 0})


def _last_starts(tokens: Sequence[int], n: int) -> dict[tuple, int]:
    """For every n-gram of ``tokens``, the start index of its last occurrence."""
    return {tuple(tokens[i : i + n]): i for i in range(len(tokens) - n + 1)}


def extraction_likelihood_fast(
    tokens: Sequence[int],
    match: Sequence[bool],
    continuations: Mapping[int, Sequence[int]],
    n: int,
    prompt_length: int = 0,
) -> float:
    """EL_n from the teacher-forced row and one continuation per wrong position.

    ``continuations[f]`` is the greedy continuation of ``tokens[:f+1]`` (T-f-1 tokens) for each f
    in ``continuation_starts(match, T-n, first_prefix(prompt_length))``. Equals
    ``extraction_likelihood_reference`` (same ``prompt_length``) exactly.

    For prefix p with first error f, the generation is ``y_f[p:]`` with
    ``y_f = tokens[:f+1] + continuations[f]``; an n-gram of it starting at s lies among the
    n-grams of ``tokens[p:]`` iff the gram's last occurrence in ``tokens`` starts at or after p.
    Grams ending at or before f are copied from ``tokens[p:]`` and so always count.
    """
    T, start_prefix = len(tokens), first_prefix(prompt_length)
    tokens = list(tokens)
    last_start = _last_starts(tokens, n)
    errs = first_errors(match)
    per_error_cache: dict[int, tuple[int, np.ndarray]] = {}
    total = 0.0
    for p in range(start_prefix, T - n + 1):
        f = int(errs[p - 1])
        if f < 0:  # memorized from here on: the continuation is the target itself
            total += 1.0
            continue
        if f not in per_error_cache:
            y = tokens[: f + 1] + list(continuations[f])
            first = max(0, f + 2 - n)  # first gram that reaches into the generated part
            last = np.array(
                [last_start.get(tuple(y[s : s + n]), -1) for s in range(first, T - n + 1)],
                dtype=np.int64,
            )
            per_error_cache[f] = (first, last)
        first, last = per_error_cache[f]
        start = max(p, first)
        copied = start - p  # grams entirely inside tokens[p:f+1]
        hits = copied + int(np.count_nonzero(last[start - first :] >= p))
        total += hits / (T - p - n + 1)
    return total / (T - n - start_prefix + 1)


def sequence_metrics(
    tokens: Sequence[int],
    match: Sequence[bool],
    nll: Sequence[float],
    *,
    extract_k: Sequence[int] = (32,),
    prompt_length: int = 0,
) -> dict:
    """The teacher-forced metrics of one sequence (everything but EL_n). With a prompt of P
    tokens, ``n_tokens`` counts the response (T-P), MA / loss / longest run cover the positions
    predicting it (``scored_start``), and K-extractability's prefix is the prompt plus the first
    K response tokens (Carlini et al.'s prefix is then x[:P+K])."""
    start = scored_start(prompt_length)
    match, nll = match[start:], nll[start:]
    out = {
        "n_tokens": len(tokens) - int(prompt_length),
        "loss": float(np.mean(np.asarray(nll, dtype=np.float64))),
        "ma": memorization_accuracy(match),
        "max_verbatim": longest_true_run(match),
    }
    for k in extract_k:
        # match is already cut at P-1 (or 0): match[P+K-1:] of the full row is match[K + (P>0) - 1:] here.
        out[f"extractable_k{k}"] = is_extractable(match, k + (1 if prompt_length > 0 else 0))
    return out
