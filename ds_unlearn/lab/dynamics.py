"""The memorisation lab's pure parts (Speicher et al. 2024): random strings and their
entropy, the character-to-token check, phase detection, and the contexts of the local-prefix and
global-context probes. No model runs here; ``lab/experiments.py`` runs the experiments.

Conventions: a string is a list of symbol indices (0..l-1); a sequence is its token ids, with a
BOS token in front when the run uses one. Accuracy rows come from one teacher-forced pass, so a
row has one entry per predicted token (``len(sequence) - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core.errors import InputError

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# -- character distributions -----------------------------------------------------------------
def entropy_bits(probabilities: Sequence[float]) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _geometric(size: int, beta: float) -> np.ndarray:
    weights = np.exp(-beta * np.arange(size))
    return weights / weights.sum()


def skewed_probabilities(size: int, target_bits: float) -> np.ndarray:
    """p_i proportional to exp(-beta * i), with beta solved by bisection so the entropy is
    ``target_bits``. One parameter keeps every symbol possible and the order of frequencies fixed,
    and entropy falls monotonically in beta, so the solution is unique."""
    top = math.log2(size)
    if not 0.0 < target_bits <= top + 1e-12:
        raise InputError(f"target_entropy: must lie in (0, log2 {size} = {top:.4f}] bits, got {target_bits}")
    low, high = 0.0, 1.0
    while entropy_bits(_geometric(size, high)) > target_bits:
        high *= 2.0
    for _ in range(200):  # far below 1e-12 bits; bisection halves the bracket each time
        mid = (low + high) / 2
        if entropy_bits(_geometric(size, mid)) > target_bits:
            low = mid
        else:
            high = mid
    return _geometric(size, (low + high) / 2)


def character_distribution(size: int, name: str, target_bits: float | None) -> np.ndarray:
    if name == "uniform":
        return np.full(size, 1.0 / size)
    return skewed_probabilities(size, target_bits)


def different_distribution(probabilities: np.ndarray) -> np.ndarray:
    """The global-context probe's 'different' statistics over the same symbols: uniform strings
    get a skewed distribution of half their entropy, skewed strings get the uniform one."""
    size = len(probabilities)
    if np.allclose(probabilities, 1.0 / size):
        return skewed_probabilities(size, math.log2(size) / 2)
    return np.full(size, 1.0 / size)


def sample_strings(probabilities: np.ndarray, length: int, count: int, rng: np.random.Generator) -> list[list[int]]:
    """``count`` strings of i.i.d. symbol indices drawn from ``probabilities``."""
    return rng.choice(len(probabilities), size=(count, length), p=probabilities).tolist()


def string_entropy_bits(string: Sequence[int]) -> float:
    """Entropy of the string's own character frequencies (bits per character)."""
    _, counts = np.unique(np.asarray(string), return_counts=True)
    return entropy_bits(counts / counts.sum())


def chance_level(string: Sequence[int]) -> float:
    """Frequency of the string's most frequent character: the accuracy of its best constant guess."""
    _, counts = np.unique(np.asarray(string), return_counts=True)
    return float(counts.max() / counts.sum())


# -- characters to tokens ----------------------------------------------------------------------
def map_symbols(tokenizer, symbols: Sequence[str]) -> tuple[list[int], bool]:
    """One token id per symbol, and whether the symbols need a leading space to be one token.

    Tries the whole alphabet bare, then after a space (SentencePiece and GPT-2 style tokenizers
    differ), so every symbol follows one convention. Raises ``InputError`` naming the first
    character that is not exactly one distinct, known token either way.
    """
    failures = []
    for leading_space in (False, True):
        ids, failure = _single_tokens(tokenizer, symbols, " " if leading_space else "")
        if failure is None:
            return ids, leading_space
        failures.append((len(ids), leading_space, failure))
    # Name the character that stopped the convention which got further: that one is the culprit.
    (_, spaced, (symbol, why)), (_, _, (other, other_why)) = sorted(failures, key=lambda f: -f[0])
    raise InputError(
        f"symbols: for this tokenizer, character {symbol!r} is {why} {'with' if spaced else 'without'} a "
        f"leading space, and {other!r} is {other_why} {'without' if spaced else 'with'} one; every character "
        f"must be exactly one token of its own, all in the same way"
    )


def _single_tokens(tokenizer, symbols: Sequence[str], prefix: str) -> tuple[list[int], tuple | None]:
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    for symbol in symbols:
        tokens = tokenizer(prefix + symbol, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            return ids, (symbol, f"{len(tokens)} tokens {tokens}")
        if tokens[0] == unknown:
            return ids, (symbol, "the unknown token")
        if tokens[0] in ids:
            return ids, (symbol, f"token {tokens[0]}, the same as {symbols[ids.index(tokens[0])]!r}")
        ids.append(tokens[0])
    return ids, None


# -- phases ------------------------------------------------------------------------------------
def clear_margin(control: float, positions: int, minimum: float) -> float:
    """How far above the unseen control a string's accuracy must be to count as memorised: the
    larger of ``minimum`` and two binomial standard errors of the control level over the string's
    positions. A short binary string scores 0.7 by luck; a 26-letter one does not."""
    return max(minimum, 2.0 * math.sqrt(max(control * (1.0 - control), 0.0) / positions))


def first_epoch(epochs: Sequence[int], flags: Sequence[bool]) -> int | None:
    return next((e for e, f in zip(epochs, flags) if f), None)


def settled_epoch(epochs: Sequence[int], flags: Sequence[bool]) -> int | None:
    """First epoch from which ``flags`` hold through the end (None if the last one fails)."""
    start = None
    for epoch, flag in zip(epochs, flags):
        start = (epoch if start is None else start) if flag else None
    return start


def detect_phases(
    epochs: Sequence[int],
    accuracy: Sequence[float],
    control: Sequence[float],
    positions: int,
    minimum_margin: float,
    full: float = 0.99,
) -> dict:
    """Guessing then memorisation, for one accuracy curve against the unseen control's.

    Memorisation starts at the first epoch from which accuracy stays clearly above the control
    (``clear_margin``) to the end of the curve, so one lucky epoch does not count; the guessing
    phase is everything before it. ``full_at`` is the first epoch accuracy reaches ``full``.
    """
    above = [a > c + clear_margin(c, positions, minimum_margin) for a, c in zip(accuracy, control)]
    start = settled_epoch(epochs, above)
    guessing = [e for e in epochs if start is None or e < start]
    return {
        "guessing": [guessing[0], guessing[-1]] if guessing else None,
        "memorisation_start": start,
        "full_at": first_epoch(epochs, [a >= full for a in accuracy]),
    }


def guessing_band_entry(
    epochs: Sequence[int], accuracy: Sequence[float], control: Sequence[float], positions: int, minimum_margin: float
) -> int | None:
    """Unlearning in reverse: the first epoch accuracy is back within the margin of the control."""
    inside = [a <= c + clear_margin(c, positions, minimum_margin) for a, c in zip(accuracy, control)]
    return first_epoch(epochs, inside)


# -- positions -----------------------------------------------------------------------------------
def shared_contexts(strings: Sequence[Sequence[int]], keep: int) -> list[list[bool]]:
    """Per string and predicted position, whether another training string has the same context
    there but a different next character. No model gets both right, so with several short
    strings over a small alphabet (which share openings) accuracy 1 is out of reach.

    Position j predicts character j+1 from characters 0..j, or with BOS (``keep`` 1) character j
    from characters 0..j-1; rows line up with the teacher-forced match rows.
    """
    offset = 1 - keep
    context = [0] * len(strings)  # an id per distinct prefix; all empty at first
    rows: list[list[bool]] = [[] for _ in strings]
    for c in range(len(strings[0])):
        if c >= offset:  # character c is predicted from characters 0..c-1
            following: dict[int, set] = {}
            for ctx, string in zip(context, strings):
                following.setdefault(ctx, set()).add(string[c])
            for row, ctx in zip(rows, context):
                row.append(len(following[ctx]) > 1)
        ids: dict[tuple, int] = {}
        context = [ids.setdefault((ctx, string[c]), len(ids)) for ctx, string in zip(context, strings)]
    return rows


def learned_at(epochs: Sequence[int], rows: np.ndarray) -> list[int | None]:
    """Per position, the epoch from which it stays correct (``rows``: epochs x positions, bool)."""
    return [settled_epoch(epochs, rows[:, j]) for j in range(rows.shape[1])]


def first_wrong_at(epochs: Sequence[int], rows: np.ndarray) -> list[int | None]:
    """Per position, the first epoch it is wrong: when forgetting reaches it."""
    return [first_epoch(epochs, ~rows[:, j]) for j in range(rows.shape[1])]


def rank_correlation(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's rho over the pairs where both values exist (ties get their mean rank)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    x, y = (_ranks(np.asarray(v, dtype=np.float64)) for v in zip(*pairs))
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# -- probe contexts ----------------------------------------------------------------------------
# Position j of a match row predicts token j+1 from tokens 0..j. A probe for position j is a short
# sequence whose last token is that target, so its teacher-forced row's last entry is the answer.
def local_windows(sequence: Sequence[int], k: int, keep: int) -> dict[int, list[int]]:
    """For every position whose context exceeds ``k`` string tokens, the probe that shows only
    the last ``k`` of them (after the ``keep`` leading tokens, i.e. BOS, which always stay).
    Positions not listed see their whole context already: their full-context answer stands."""
    probes = {}
    for j in range(len(sequence) - 1):
        if j + 1 - keep > k:
            probes[j] = list(sequence[:keep]) + list(sequence[j + 1 - k : j + 2])
    return probes


def replaced_contexts(sequence: Sequence[int], k: int, keep: int, fresh: Sequence[int]) -> dict[int, list[int]]:
    """For every position whose context exceeds ``k`` string tokens, the full-length probe whose
    tokens before the last ``k`` are replaced by ``fresh`` ones (drawn from some distribution):
    the local prefix stays, the global context changes."""
    probes = {}
    for j in range(len(sequence) - 1):
        cut = j + 1 - k
        if cut > keep:
            probes[j] = list(sequence[:keep]) + list(fresh[: cut - keep]) + list(sequence[cut : j + 2])
    return probes


def smallest_k(ks: Sequence[int], accuracy: Sequence[float], full: float, fraction: float = 0.9) -> int | None:
    """The shortest local prefix whose accuracy reaches ``fraction`` of full-context accuracy."""
    return next((k for k, a in sorted(zip(ks, accuracy)) if a >= fraction * full), None)


def default_ks(longest_context: int) -> list[int]:
    """Every k up to 16 (where the 90% point of short strings lies), every 4th up to 32, then
    powers of two, and always ``longest_context - 1``; all shorter than the longest context.

    The last one keeps the 90% point findable on every string length: a ladder that stopped at 16
    left 32-character strings whose 90% point lies at 17..30 with no answer at all.
    """
    ks = [*range(1, 17), *range(20, 33, 4), *(2**p for p in range(6, 12)), longest_context - 1]
    return sorted({k for k in ks if 1 <= k < longest_context})
