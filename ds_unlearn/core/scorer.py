"""Score how strongly a causal LM has memorized each sequence, on one process or sharded.

``score_sequences`` runs one teacher-forced pass for MA / loss / longest run / k-extractability,
then greedy continuations only from the wrong positions for EL_n (see memorization.py). Under a
process group the rows are sharded across ranks and the gathered results reach every rank; all
ranks run the same number of forward calls so ZeRO-3 parameter gathers never hang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import distributed as D
from .errors import InputError
from .memorization import (
    continuation_starts,
    extraction_likelihood_fast,
    extraction_likelihood_reference,
    sequence_metrics,
)
from .passes import greedy_continuations, teacher_forced_rows

DEFAULT_BATCH_SIZE = 16
DEFAULT_EL_N = 10  # both papers' n of EL_n
DEFAULT_EXTRACT_K = 32  # K of k-extractability (Carlini et al.)
METHODS = ("fast", "reference")


def min_length(el_n: Sequence[int], extract_k: Sequence[int]) -> int:
    """Shortest sequence every requested metric is defined on."""
    return max([2, *(n + 1 for n in el_n), *(k + 1 for k in extract_k)])


def validate_request(
    sequences: Sequence[Sequence[int]],
    el_n: Sequence[int],
    extract_k: Sequence[int],
    vocab_size: int | None,
    describe_row: Callable[[int], str] = lambda i: f"row {i}",
) -> None:
    """Reject what the metrics are undefined on, naming the first offending row."""
    if not sequences:
        raise InputError("the set of sequences is empty")
    for name, values in (("el_n", el_n), ("extract_k", extract_k)):
        bad = [v for v in values if int(v) < 1]
        if bad:
            raise InputError(f"{name} must hold positive integers, got {bad[0]}")
    need = min_length(el_n, extract_k)
    for i, seq in enumerate(sequences):
        if len(seq) < need:
            raise InputError(
                f"{describe_row(i)}: {len(seq)} tokens, but el_n={list(el_n)} and "
                f"extract_k={list(extract_k)} need at least {need}"
            )
        if vocab_size is not None:
            for tok in seq:
                if not 0 <= int(tok) < vocab_size:
                    raise InputError(f"{describe_row(i)}: token id {tok} is outside the vocabulary [0, {vocab_size})")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_generation_chunks(model, chunks, progress) -> list[list[list[int]]]:
    """Generate every chunk of (prompt, num_new) requests, in lockstep across ranks.

    Each chunk takes max(num_new) forward calls; ranks agree on the per-chunk call counts, and a
    rank with fewer chunks runs one-token dummies so every rank calls the model equally often.
    """
    own_steps = [max(n for _, n in chunk) for chunk in chunks]
    all_steps = D.all_gather_objects(own_steps)
    num_chunks = max(len(s) for s in all_steps)
    steps = [max(s[i] if i < len(s) else 0 for s in all_steps) for i in range(num_chunks)]
    results = []
    for i in progress(range(num_chunks), "generate"):
        if i < len(chunks):
            prompts, lengths = zip(*chunks[i])
            results.append(greedy_continuations(model, prompts, lengths, forward_calls=steps[i]))
        else:
            greedy_continuations(model, [[0]], [1], forward_calls=steps[i])
    return results


def _teacher_forced(model, sequences, batch_size, progress):
    rows = []
    for batch in progress(_chunks(list(sequences), batch_size), "forward"):
        rows.extend(teacher_forced_rows(model, batch))
    return rows


def _el_fast(model, sequences, rows, el_n, batch_size, progress) -> list[dict]:
    requests = []  # (sequence index, error position, prompt, num_new)
    for i, (seq, (match, _)) in enumerate(zip(sequences, rows)):
        for f in continuation_starts(match, len(seq) - min(el_n)):
            requests.append((i, f, list(seq[: f + 1]), len(seq) - f - 1))
    # Longest first, so rows sharing a chunk need similar numbers of steps.
    requests.sort(key=lambda r: -r[3])
    chunks = _chunks(requests, batch_size)
    generated = _run_generation_chunks(model, [[(r[2], r[3]) for r in c] for c in chunks], progress)
    continuations: list[dict[int, list[int]]] = [{} for _ in sequences]
    for chunk, outs in zip(chunks, generated):
        for (i, f, _, _), cont in zip(chunk, outs):
            continuations[i][f] = cont
    return [
        {f"el_{n}": extraction_likelihood_fast(list(seq), match, continuations[i], n) for n in el_n}
        for i, (seq, (match, _)) in enumerate(zip(sequences, rows))
    ]


def _el_reference(model, sequences, el_n, batch_size, progress) -> list[dict]:
    """The papers' procedure: one greedy generation per prefix length (batched over sequences)."""
    n_min = min(el_n)
    requests_by_prefix: dict[int, list] = {}
    for i, seq in enumerate(sequences):
        for p in range(1, len(seq) - n_min + 1):
            requests_by_prefix.setdefault(p, []).append((i, list(seq[:p]), len(seq) - p))
    chunks = [c for p in sorted(requests_by_prefix) for c in _chunks(requests_by_prefix[p], batch_size)]
    generated = _run_generation_chunks(model, [[(r[1], r[2]) for r in c] for c in chunks], progress)
    continuations: list[dict[int, list[int]]] = [{} for _ in sequences]
    for chunk, outs in zip(chunks, generated):
        for (i, prompt, _), cont in zip(chunk, outs):
            continuations[i][len(prompt)] = cont
    return [
        {f"el_{n}": extraction_likelihood_reference(list(seq), continuations[i], n) for n in el_n}
        for i, seq in enumerate(sequences)
    ]


def _score_local(model, sequences, el_n, extract_k, batch_size, method, progress) -> list[dict]:
    rows = _teacher_forced(model, sequences, batch_size, progress)
    if not el_n:  # teacher-forced metrics only
        els = [{} for _ in sequences]
    elif method == "fast":
        els = _el_fast(model, sequences, rows, el_n, batch_size, progress)
    else:
        els = _el_reference(model, sequences, el_n, batch_size, progress)
    results = []
    for seq, (match, nll), el in zip(sequences, rows, els):
        metrics = sequence_metrics(seq, match, nll, extract_k=extract_k)
        # Key order of the output files: n_tokens, loss, ma, el_*, max_verbatim, extractable_*.
        ordered = {k: metrics[k] for k in ("n_tokens", "loss", "ma")}
        ordered.update(el)
        ordered.update({k: v for k, v in metrics.items() if k not in ordered})
        results.append(ordered)
    return results


def _no_progress(iterable, _desc):
    return iterable


def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    el_n: Sequence[int] = (DEFAULT_EL_N,),
    extract_k: Sequence[int] = (DEFAULT_EXTRACT_K,),
    batch_size: int | None = None,
    method: str = "fast",
    progress: bool = False,
) -> list[dict]:
    """Per-sequence memorization metrics of ``model`` on token-id ``sequences``.

    Returns one dict per sequence, in order: ``n_tokens``, ``loss``, ``ma``, ``el_{n}``,
    ``max_verbatim``, ``extractable_k{K}``. The model keeps its dtype and device. Inside a
    torch.distributed process group the sequences are sharded over ranks and every rank gets the
    full list back; every rank must call this with the same arguments.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    el_n, extract_k = tuple(int(n) for n in el_n), tuple(int(k) for k in extract_k)
    validate_request(sequences, el_n, extract_k, getattr(model.config, "vocab_size", None))
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    bar = _progress_bar if progress and D.is_main() else _no_progress

    was_training = model.training
    model.eval()
    try:
        indices = D.shard_indices(len(sequences))
        local = _score_local(model, [sequences[i] for i in indices], el_n, extract_k, batch_size, method, bar)
    finally:
        model.train(was_training)
    return D.gather_shards(local, len(sequences))


def _progress_bar(iterable, desc):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
