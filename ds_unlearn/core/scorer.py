"""Score how strongly a causal LM has memorized each sequence, on one process or sharded.

``score_sequences`` runs one teacher-forced pass for MA / loss / longest run / k-extractability,
then greedy continuations only from the wrong positions for EL_n (see memorization.py). Under a
process group the rows are sharded across ranks and the gathered results reach every rank; all
ranks run the same number of forward calls so ZeRO-3 parameter gathers never hang.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as D
from .continuations import MAX_DRAFT, ContinuationBatch, Request, run_in_lockstep, supports
from .errors import InputError, NonFiniteLogitsError, param
from .memorization import (
    continuation_starts,
    extraction_likelihood_fast,
    extraction_likelihood_reference,
    first_prefix,
    scored_start,
    sequence_metrics,
)
from .mia import mia_scores, token_bytes
from .passes import greedy_continuations, model_device, teacher_forced_pass

DEFAULT_BATCH_SIZE = 16
DEFAULT_EL_N = 10  # both papers' n of EL_n
DEFAULT_EXTRACT_K = 32  # K of k-extractability (Carlini et al.)
METHODS = ("fast", "reference")


def int_tuple(name: str, value) -> tuple[int, ...]:
    """``value``, an int or an iterable of ints (numpy integers too; empty: none), as a tuple of ints.
    Raises InputError naming ``name`` for anything else: a string (``"10"`` would otherwise read as
    1 and 0), a bool, a float."""
    items = (value,) if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) else tuple(value)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise InputError(f"{name} must be an int or several ints, got {value!r}")
    return tuple(int(v) for v in items)


def min_length(el_n: Sequence[int], extract_k: Sequence[int], prompt_length: int = 0) -> int:
    """Shortest sequence (prompt included) every requested metric is defined on: EL_n needs n
    tokens after its shortest prefix (``first_prefix``), K-extractability one token after the
    prompt and K response tokens, MA one scored token."""
    start = first_prefix(prompt_length)
    return max([start + 1, *(start + n for n in el_n), *(prompt_length + k + 1 for k in extract_k)])


def scored_tokens(row: dict) -> int:
    """How many positions a ``score_sequences`` row's loss and MA average over: its ``n_tokens``
    less the first token (never a target) when it has no prompt; with one, every response token."""
    return int(row["n_tokens"]) - (0 if row.get("n_prompt_tokens") else 1)


def prompt_rows(prompt_lengths, count: int) -> list[int]:
    """``prompt_lengths`` (None: no prompts) as ``count`` non-negative ints; InputError otherwise."""
    if prompt_lengths is None:
        return [0] * count
    rows = int_tuple("prompt_lengths", prompt_lengths)
    if len(rows) != count:
        raise InputError(f"prompt_lengths has {len(rows)} entries for {count} sequences")
    bad = next((i for i, p in enumerate(rows) if p < 0), None)
    if bad is not None:
        raise InputError(f"prompt_lengths[{bad}] is {rows[bad]}, not a length")
    return list(rows)


def context_limit(model_or_config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``; GPT-2's ``n_positions`` maps to
    it), or None when the config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def token_rows(sequences) -> list:
    """``sequences`` as a list of token-id rows: a 2-D tensor or array [rows, tokens] is split
    into rows; text is refused. Raises InputError naming the first text row."""
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        if sequences.ndim != 2:
            raise InputError(f"sequences as one array must be 2-D [rows, tokens], got shape {tuple(sequences.shape)}")
        return sequences.tolist()
    if isinstance(sequences, (str, bytes)):
        raise InputError("sequences must be a list of token-id sequences, got one string: tokenize text first")
    rows = list(sequences)
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)):
            raise InputError(f"row {i} is text, not token ids: tokenize it first (e.g. tokenizer(text)['input_ids'])")
    return rows


def validate_request(
    sequences: Sequence[Sequence[int]],
    el_n: Sequence[int],
    extract_k: Sequence[int],
    vocab_size: int | None,
    describe_row: Callable[[int], str] = lambda i: f"row {i}",
    max_positions: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> None:
    """Reject what the metrics are undefined on, naming the first offending row: too short for
    el_n/extract_k (with a prompt: a response too short, ``min_length``), longer than the model's
    context (``max_positions``), or a token that is not an integer or lies outside the vocabulary."""
    if not sequences:
        raise InputError("the set of sequences is empty")
    for name, values in (("el_n", el_n), ("extract_k", extract_k)):
        bad = [v for v in values if int(v) < 1]
        if bad:
            raise InputError(f"{name} must hold positive integers, got {bad[0]}")
    prompts = prompt_rows(prompt_lengths, len(sequences))
    for i, seq in enumerate(sequences):
        need = min_length(el_n, extract_k, prompts[i])
        if prompts[i] and len(seq) < need:
            raise InputError(
                f"{describe_row(i)}: its prompt of {prompts[i]} tokens leaves {len(seq) - prompts[i]} response "
                f"tokens, but el_n={list(el_n)} and extract_k={list(extract_k)} need at least "
                f"{need - prompts[i]} (lower them, shorten the prompt, or drop the row)"
            )
        if len(seq) < need:
            raise InputError(
                f"{describe_row(i)}: {len(seq)} tokens, but el_n={list(el_n)} and "
                f"extract_k={list(extract_k)} need at least {need} (lower them, or drop the row)"
            )
        if max_positions is not None and len(seq) > max_positions:
            raise InputError(
                f"{describe_row(i)}: {len(seq)} tokens, longer than the model's context of {max_positions} "
                f"positions (cut rows to at most {max_positions} tokens)"
            )
        if vocab_size is not None:
            for tok in seq:
                if int(tok) != tok:
                    raise InputError(f"{describe_row(i)}: {tok!r} is not an integer token id")
                if not 0 <= int(tok) < vocab_size:
                    raise InputError(f"{describe_row(i)}: token id {tok} is outside the vocabulary [0, {vocab_size})")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _column_chunks(requests: list, size: int, limit: int | None) -> list[list]:
    """Requests (..., prompt, num_new) in chunks of at most ``size`` whose left-padded decode never
    needs more than ``limit`` columns (longest prompt + most steps): a chunk that mixed a long prompt
    with a long request would push rows past the model's last position."""
    chunks: list[list] = []
    for req in requests:
        chunk = chunks[-1] if chunks else None
        if chunk is not None and len(chunk) < size:
            width = max(len(req[-2]), *(len(r[-2]) for r in chunk))
            steps = max(req[-1], *(r[-1] for r in chunk))
            if limit is None or width + steps <= limit:
                chunk.append(req)
                continue
        chunks.append([req])
    return chunks


def _run_generation_chunks(model, chunks, progress, any_rank) -> list[list[list[int]]]:
    """Generate every chunk of (prompt, num_new) requests, in lockstep across ranks.

    Each chunk takes max(num_new) forward calls; ranks agree on the per-chunk call counts, and a
    rank with fewer chunks runs one-token dummies so every rank calls the model equally often
    (``any_rank`` is the identity when ranks need no lockstep).
    """
    own_steps = [max(n for _, n in chunk) for chunk in chunks]
    lockstep = any_rank is D.any_rank
    all_steps = D.all_gather_objects(own_steps) if lockstep else [own_steps]
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


def _dummy_forward(model) -> None:
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model_device(model)), use_cache=False)


def _expected_run(match) -> float:
    """Mean length of a run of correct teacher-forced predictions: how many drafts of the
    memorized text a continuation of this sequence may get accepted per round."""
    match = np.asarray(match, dtype=bool)
    runs = int(np.count_nonzero(match[1:] & ~match[:-1])) + int(bool(match[:1].any()))
    return float(match.sum()) / max(runs, 1)


def _el_fast_batch(model, sequences, prompts, tf, el_n, rows, any_rank) -> list[dict]:
    """EL_n of one teacher-forced batch: continuations only from the wrong positions after each
    row's prompt, decoded draft-and-verify from the pass's own KV cache (continuations.py: the
    prompt's keys and values are copied from that pass, never recomputed)."""
    requests, owners = [], []
    for i, (seq, (match, _)) in enumerate(zip(sequences, tf.rows)):
        if i in tf.nonfinite:
            continue  # its metrics are void; the caller raises once every rank is done
        for f in continuation_starts(match, len(seq) - min(el_n), first_prefix(prompts[i])):
            requests.append(Request(seq=i, start=f, length=len(seq) - f - 1))
            owners.append((i, f))
    continuations: list[dict[int, list[int]]] = [{} for _ in sequences]
    nonfinite = set(tf.nonfinite)
    if supports(tf.cache):
        expected = np.array([_expected_run(m) for m, _ in tf.rows])
        batch = ContinuationBatch(
            model, tf.tokens, tf.predictions, tf.cache, requests, expected, rows, context_limit(model)
        )
        run_in_lockstep([batch], lambda: _dummy_forward(model), any_rank)
        outs = batch.results
        nonfinite |= batch.nonfinite
    else:  # sliding-window or recurrent caches: plain batched decoding, chunked to stay in context
        reqs = sorted(
            ((i, f, list(sequences[i][: f + 1]), n) for (i, f), n in zip(owners, (r.length for r in requests))),
            key=lambda r: -r[3],
        )
        chunks = _column_chunks(reqs, rows, context_limit(model))
        generated = _run_generation_chunks(model, [[(r[2], r[3]) for r in c] for c in chunks], _no_progress, any_rank)
        by_owner = {(r[0], r[1]): cont for c, outs in zip(chunks, generated) for r, cont in zip(c, outs)}
        outs = [by_owner[o] for o in owners]
    for (i, f), cont in zip(owners, outs):
        continuations[i][f] = cont
    tf.nonfinite = sorted(nonfinite)
    return [
        {}
        if i in nonfinite
        else {f"el_{n}": extraction_likelihood_fast(list(seq), match, continuations[i], n, prompts[i]) for n in el_n}
        for i, (seq, (match, _)) in enumerate(zip(sequences, tf.rows))
    ]


def _el_reference(model, sequences, prompts, el_n, batch_size, progress, any_rank) -> list[dict]:
    """The papers' procedure: one greedy generation per prefix length (batched over sequences),
    from the whole prompt on."""
    n_min = min(el_n)
    requests_by_prefix: dict[int, list] = {}
    for i, seq in enumerate(sequences):
        for p in range(first_prefix(prompts[i]), len(seq) - n_min + 1):
            requests_by_prefix.setdefault(p, []).append((i, list(seq[:p]), len(seq) - p))
    chunks = [c for p in sorted(requests_by_prefix) for c in _chunks(requests_by_prefix[p], batch_size)]
    generated = _run_generation_chunks(model, [[(r[1], r[2]) for r in c] for c in chunks], progress, any_rank)
    continuations: list[dict[int, list[int]]] = [{} for _ in sequences]
    for chunk, outs in zip(chunks, generated):
        for (i, prompt, _), cont in zip(chunk, outs):
            continuations[i][len(prompt)] = cont
    return [
        {f"el_{n}": extraction_likelihood_reference(list(seq), continuations[i], n, prompts[i]) for n in el_n}
        for i, seq in enumerate(sequences)
    ]


@torch.no_grad()
def _score_local(
    model, sequences, prompts, el_n, extract_k, sizes, method, progress, any_rank, membership=False, with_prompts=False
) -> tuple[list[dict], list[int]]:
    """Metrics of this rank's sequences (``prompts``: each one's prompt length), and the indices
    (into ``sequences``) with non-finite logits."""
    fast = bool(el_n) and method == "fast"
    rows, els, nonfinite, moments = [], [], [], []
    batches = zip(_chunks(list(sequences), sizes.sequences), _chunks(list(prompts), sizes.sequences))
    for b, (batch, batch_prompts) in enumerate(progress(list(batches), "score")):
        tf = teacher_forced_pass(model, batch, keep_cache=fast, moments=membership)
        if membership:
            moments.extend(tf.moments)
        if fast:
            els.extend(_el_fast_batch(model, batch, batch_prompts, tf, el_n, sizes.rows, any_rank))
        tf.cache = None  # the KV cache can be large; only this batch's continuations needed it
        rows.extend(tf.rows)
        nonfinite.extend(b * sizes.sequences + i for i in tf.nonfinite)
    if not el_n:  # teacher-forced metrics only
        els = [{} for _ in sequences]
    elif not fast:
        els = _el_reference(model, sequences, prompts, el_n, sizes.rows, progress, any_rank)
    results = []
    for i, (seq, (match, nll), el) in enumerate(zip(sequences, rows, els)):
        metrics = sequence_metrics(seq, match, nll, extract_k=extract_k, prompt_length=prompts[i])
        # Key order of the output files: n_tokens, [n_prompt_tokens], loss, ma, el_*, max_verbatim,
        # extractable_*.
        ordered = {"n_tokens": metrics["n_tokens"]}
        if with_prompts:
            ordered["n_prompt_tokens"] = prompts[i]
        ordered.update({k: metrics[k] for k in ("loss", "ma")})
        ordered.update(el)
        ordered.update({k: v for k, v in metrics.items() if k not in ordered})
        if membership:
            mu, sigma = moments[i]
            start = scored_start(prompts[i])
            mia = mia_scores(-nll[start:], mu[start:], sigma[start:], token_bytes(seq[prompts[i] :]))
            ordered.update({k: v for k, v in mia.items() if k != "loss"})
        results.append(ordered)
    return results, nonfinite


def _no_progress(iterable, _desc):
    return iterable


@dataclass(frozen=True)
class BatchSizes:
    """Sequences per teacher-forced forward, and continuation rows decoded together."""

    sequences: int
    rows: int


AUTO = "auto"
MAX_AUTO_SEQUENCES = 64
MAX_AUTO_ROWS = {"cpu": 4096, "cuda": 8192}  # past these, bigger batches stop paying on that device


def resolve_batch_size(
    model, batch_size: int | str | None, max_tokens: int, free_bytes: int | None = None
) -> BatchSizes:
    """``batch_size`` as the scorer uses it. An int sets both sizes (and caps memory). ``"auto"``
    (also what None means) sizes them from a quarter of the free memory (``free_bytes``; default:
    the GPU's free memory, or the host's MemAvailable on CPU): a continuation row costs its KV cache
    (``max_tokens`` + one block of drafts) plus a block of logits, and a teacher-forced batch holds no
    more sequences than its continuations can all decode together (unseen text needs about one row
    per token). Raises InputError for anything else."""
    if batch_size is None or batch_size == AUTO:
        device = model_device(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        free = D.free_memory_bytes(device) if free_bytes is None else free_bytes
        budget = free // 4
        width = max(2, max_tokens)
        kv = _kv_bytes_per_token(model, config)
        vocab = int(config.vocab_size)
        per_row = (width + MAX_DRAFT + 1) * kv + 2 * (MAX_DRAFT + 1) * 4 * vocab
        rows = int(min(MAX_AUTO_ROWS.get(device.type, MAX_AUTO_ROWS["cpu"]), max(1, budget // per_row)))
        per_sequence = width * (3 * 4 * vocab + kv)  # logits in fp32 (three live copies) and KV cache
        sequences = min(MAX_AUTO_SEQUENCES, budget // per_sequence, rows // (width - 1))
        return BatchSizes(sequences=int(max(1, sequences)), rows=rows)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return BatchSizes(batch_size, batch_size)


def _kv_bytes_per_token(model, config) -> int:
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 1))
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    el_n: Sequence[int] = (DEFAULT_EL_N,),
    extract_k: Sequence[int] = (DEFAULT_EXTRACT_K,),
    batch_size: int | str | None = None,
    method: str = "fast",
    progress: bool = False,
    gather_params: bool | None = None,
    membership: bool = False,
    prompt_lengths: Sequence[int] | None = None,
) -> list[dict]:
    """Per-sequence memorization metrics of ``model`` on token-id ``sequences`` (lists of ints,
    1-D int tensors or arrays, or one 2-D [rows, tokens] tensor; lengths may differ). ``el_n`` and
    ``extract_k``: an int or several.

    Returns one dict per sequence, in order: ``n_tokens``, ``loss``, ``ma``, ``el_{n}``,
    ``max_verbatim``, ``extractable_k{K}``; with ``membership`` also the membership scores of the
    same teacher-forced pass (``zlib`` on the token ids' bytes, ``min_k``, ``min_k++``: core/mia.py,
    from fp32 log-probabilities), which is what an unlearning run judges ``band_on`` with.

    ``prompt_lengths`` (one int per sequence, 0 for none; None: no prompts): sequence i is its
    prompt ``x[:P_i]`` followed by its response. The prompt conditions every prediction but is
    never scored: every metric covers the response (``memorization.sequence_metrics``), EL_n
    continues from prefixes of at least the whole prompt, and each row gains ``n_prompt_tokens``
    (``n_tokens`` then counts the response). The
    model keeps its dtype and device. Inside a
    torch.distributed process group the sequences are sharded over ranks and every rank gets the
    full list back; every rank must call this with the same arguments.

    ``batch_size``: an int, or ``"auto"``/None to size batches from free memory
    (``resolve_batch_size``). ``gather_params`` (ZeRO-3 only): gather the full model once for the
    whole call instead of every layer on every forward; None gathers when it fits in a quarter of
    the free memory (the ranks agree).

    Raises InputError for requests the metrics are undefined on, and for text rows (before any
    compute), and
    NonFiniteLogitsError, naming the rows, when the model's logits are NaN or inf.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    sequences = token_rows(sequences)
    el_n, extract_k = int_tuple("el_n", el_n), int_tuple("extract_k", extract_k)
    prompts = prompt_rows(prompt_lengths, len(sequences))
    validate_request(
        sequences,
        el_n,
        extract_k,
        getattr(model.config, "vocab_size", None),
        max_positions=context_limit(model),
        prompt_lengths=prompts,
    )
    # Ranks must agree (equal numbers of teacher-forced batches keep ZeRO-3 forwards in step).
    own = resolve_batch_size(model, batch_size, max(len(s) for s in sequences))
    votes = D.all_gather_objects((own.sequences, own.rows))
    sizes = BatchSizes(min(v[0] for v in votes), min(v[1] for v in votes))
    bar = _progress_bar if progress and D.is_main() else _no_progress

    was_training = model.training
    model.eval()
    try:
        indices = D.shard_indices(len(sequences))
        with D.gathered_for_inference(model, gather_params) as gathered:
            # Gathered once, every forward is local: ranks need not keep in step.
            any_rank = (lambda flag: flag) if gathered else D.any_rank
            local, bad = _score_local(
                model,
                [sequences[i] for i in indices],
                [prompts[i] for i in indices],
                el_n,
                extract_k,
                sizes,
                method,
                bar,
                any_rank,
                membership,
                with_prompts=prompt_lengths is not None,
            )
    finally:
        model.train(was_training)
    bad_rows = sorted({row for shard in D.all_gather_objects([indices[i] for i in bad]) for row in shard})
    if bad_rows:
        raise NonFiniteLogitsError(
            f"rows {bad_rows[:10]}{' ...' if len(bad_rows) > 10 else ''}: the model's logits are NaN or inf, so "
            "their metrics are meaningless. Likely causes: non-finite weights (a diverged or corrupted "
            "checkpoint), or, in float64 with padded batches, an upstream model's padding bug (score in "
            f"float32, or with {param('batch_size')} 1)"
        )
    return D.gather_shards(local, len(sequences))


def _progress_bar(iterable, desc):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
