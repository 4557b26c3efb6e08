"""Audit a model against a forget set, sequence by sequence: greedy memorization (``score``),
membership inference against a holdout the model never saw, and extraction under sampling.

``audit(model, forget, holdout, ...)`` is the Python entry (``ds_unlearn.audit``) and what
``ds-unlearn audit`` runs. The model work is two sharded passes, each gathered per sequence on
every rank: ``score_sequences`` (teacher-forced + greedy continuations for EL_n) and one
teacher-forced pass for the membership scores and the sampling probability
(``passes.token_statistics``). Everything after the gather (percentiles, AUCs and their
bootstrap, verdicts, summary) is plain numpy on every rank, seeded, so every rank holds the same
result.

Verdict of a sequence, first that holds (``Thresholds`` on MA, the (n, p)-discoverability of
Hayes et al. 2024 for sampling):

    memorized          MA >= memorized_ma: greedy decoding regurgitates it
    discoverable       not memorized, but ``attack_samples`` samples reproduce its suffix with
                       probability >= ``attack_confidence``
    over-unlearned     MA <= over_unlearned_ma: pushed below ordinary text (a membership attack
                       can spot that too)
    unseen-like        none of the above
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from . import distributed as D
from .errors import InputError, param
from .memorization import scored_start
from .mia import (
    DEFAULT_ATTACK_CONFIDENCE,
    DEFAULT_ATTACK_SAMPLES,
    DEFAULT_BOOTSTRAP,
    DEFAULT_MIN_K,
    DEFAULT_PREFIX,
    DEFAULT_SUFFIX,
    MIA_SCORES,
    REF_SCORE,
    auc_difference,
    extraction_figures,
    forget_quality,
    mia_scores,
    percentile_in,
    privleak,
    ref_score,
    roc_auc,
    roc_auc_interval,
    token_bytes,
    tpr_at_fpr_figures,
    two_sided,
)
from .passes import decoding_processors, token_statistics
from .scorer import DEFAULT_BATCH_SIZE, DEFAULT_EL_N, DEFAULT_EXTRACT_K, min_length, score_sequences
from .summary import summarize_scores
from .verdict import IN_BAND, MEMORIZED, OVER_UNLEARNED, Thresholds, check_holdout_size

VERDICTS = ("memorized", "discoverable", "over-unlearned", "unseen-like")
SETS = ("forget", "holdout")
# Per-sequence numbers whose before/after change a --baseline audit reports.
CHANGE_KEYS = ("loss", "ma", "zlib", "min_k", "min_k++", "log10_p")
# The settings that set how long a sequence must be, as a too-short row's error names them.
_LENGTHS = f"{param('suffix_length')}, {param('el_n')} and {param('extract_k')}"


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AuditSettings:
    """How to audit. Decoding settings are those of ``model.generate(do_sample=True, ...)``
    (note its own default ``top_k=50``; here None means no truncation: pure sampling, as in
    Hayes et al.). ``suffix_length`` None: the suffix is all of a sequence after its prefix.
    Each field's help is what ``ds-unlearn audit --help`` shows for it."""

    el_n: tuple[int, ...] = _setting((DEFAULT_EL_N,), "n of EL_n (several allowed)")
    extract_k: tuple[int, ...] = _setting((DEFAULT_EXTRACT_K,), "K of k-extractability")
    min_k: float = _setting(DEFAULT_MIN_K, "fraction of tokens Min-K% and Min-K%++ average")
    prefix_length: int = _setting(DEFAULT_PREFIX, "sampling extraction: prefix tokens P")
    suffix_length: int | None = _setting(DEFAULT_SUFFIX, "suffix tokens S (None: all after P)")
    temperature: float = _setting(1.0, "sampling temperature (> 0)")
    top_k: int | None = _setting(None, "top-k truncation (default off; generate()'s own default is 50)")
    top_p: float | None = _setting(None, "top-p (nucleus) truncation in (0, 1] (default off)")
    attack_samples: int = _setting(DEFAULT_ATTACK_SAMPLES, "attacker's sample budget n")
    attack_confidence: float = _setting(DEFAULT_ATTACK_CONFIDENCE, "success probability q")
    bootstrap: int = _setting(DEFAULT_BOOTSTRAP, "bootstrap resamples of each AUC (0: none)")
    seed: int = _setting(0, "seed of the bootstrap and the sampling")
    batch_size: int = _setting(DEFAULT_BATCH_SIZE, "sequences / continuations per forward")
    greedy: bool = _setting(True, "False: membership and sampling only (no score_sequences)")

    def validate(self) -> None:
        """One line per problem, naming the setting (``InputError.field``); raises InputError."""

        def bad(name, why):
            raise InputError(why, field=name)

        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature", f"must be a positive finite number, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            bad("top_k", f"must be a positive integer (or unset for no truncation), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must lie in (0, 1], got {self.top_p}")
        if not 0.0 < self.min_k <= 1.0:
            bad("min_k", f"must lie in (0, 1], got {self.min_k}")
        if self.prefix_length < 1:
            bad("prefix_length", f"must be at least 1, got {self.prefix_length}")
        if self.suffix_length is not None and self.suffix_length < 1:
            bad("suffix_length", f"must be at least 1, got {self.suffix_length}")
        if self.attack_samples < 1:
            bad("attack_samples", f"must be at least 1, got {self.attack_samples}")
        if not 0.0 < self.attack_confidence < 1.0:
            bad("attack_confidence", f"must lie in (0, 1), got {self.attack_confidence}")
        if self.bootstrap < 0:
            bad("bootstrap", f"must be 0 (no interval) or more, got {self.bootstrap}")
        if self.batch_size < 1:
            bad("batch_size", f"must be at least 1, got {self.batch_size}")
        for name, values in (("el_n", self.el_n), ("extract_k", self.extract_k)):
            if any(int(v) < 1 for v in values):
                bad(name, f"must hold positive integers, got {list(values)}")

    def min_tokens(self, prompt_length: int = 0) -> int:
        """Shortest sequence every requested figure is defined on; with a prompt of P tokens the
        sampling prefix is the prompt (``prefix_length`` is then not read) and the greedy figures
        need their lengths of response (``scorer.min_length``)."""
        extraction = (prompt_length or self.prefix_length) + (self.suffix_length or 1)
        return max(extraction, min_length(self.el_n, self.extract_k, prompt_length) if self.greedy else 2)


@dataclass
class AuditResult:
    """``rows``: one dict per sequence, forget rows first then holdout rows, each with ``id`` and
    ``set``; ``summary``: the set-level figures (``audit.json``). Never holds any text."""

    rows: list[dict]
    summary: dict
    settings: AuditSettings = field(default_factory=AuditSettings)

    def set_rows(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["set"] == name]


def _as_sequences(data, prompts=None) -> tuple[list[Any], list[list[int]], list[int]]:
    """(ids, token-id lists, prompt lengths) from a ``SequenceSet`` (its ``prompt_lengths``) or a
    plain list of token-id lists (``prompts``, default none)."""
    if hasattr(data, "sequences"):
        return list(data.ids), [list(s) for s in data.sequences], data.prompts()
    sequences = [list(s) for s in data]
    return list(range(len(sequences))), sequences, list(prompts) if prompts is not None else [0] * len(sequences)


def check_sets(
    forget: Sequence[Sequence[int]],
    holdout: Sequence[Sequence[int]],
    forget_ids: Sequence[Any] | None = None,
    holdout_ids: Sequence[Any] | None = None,
    min_tokens: int = 2,
    vocab_size: int | None = None,
    prompts: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None),
    settings: AuditSettings | None = None,
    names: tuple[str, str] = ("forget", "holdout"),
    rows: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None),
) -> None:
    """The forget and holdout sets can be audited against each other: both non-empty, at least 2
    rows each when ``settings.bootstrap`` asks for AUC intervals (each set is resampled within
    itself: every resample of a one-row set is that row, an interval blind to its sampling error),
    no id in both (when ids are given), no sequence in both, every sequence long enough (a row with
    a prompt: ``settings.min_tokens(P)``) and inside the vocabulary. Raises InputError naming the
    first offending row of the set by its parameter name, ``names`` (forget, holdout), and its file
    row: ``rows`` (``SequenceSet.rows``) when a set's sequences are not its file's rows one to one."""

    def row(k: int, i: int) -> int:
        return i if rows[k] is None else rows[k][i]

    forget_name, holdout_name = (param(n) for n in names)
    for k, (name, seqs, lengths) in enumerate(((forget_name, forget, prompts[0]), (holdout_name, holdout, prompts[1]))):
        if not seqs:
            raise InputError(f"{name}: the set is empty")
        if settings is not None and settings.bootstrap > 0 and len(seqs) < 2:
            raise InputError(
                f"{name}: 1 row, but the AUCs' bootstrap intervals ({param('bootstrap')} {settings.bootstrap}) "
                "resample each set within itself, and every resample of one row is that row (give 2 or more, or "
                f"{param('bootstrap')} 0)"
            )
        for i, seq in enumerate(seqs):
            prompt = lengths[i] if lengths is not None else 0
            if prompt and settings is not None and len(seq) < settings.min_tokens(prompt):
                raise InputError(
                    f"{name} row {row(k, i)}: its prompt of {prompt} tokens leaves {len(seq) - prompt} response "
                    f"tokens, but the audit's settings need at least {settings.min_tokens(prompt) - prompt} "
                    f"({_LENGTHS}: lower them, or {param('suffix_length')} rest)"
                )
            if not prompt and len(seq) < min_tokens:
                raise InputError(
                    f"{name} row {row(k, i)}: {len(seq)} tokens, but the audit's settings need at least {min_tokens} "
                    f"(set by {param('prefix_length')} + {_LENGTHS}: lower them, or {param('suffix_length')} rest)"
                )
            if vocab_size is not None:
                bad = next((t for t in seq if not 0 <= int(t) < vocab_size), None)
                if bad is not None:
                    raise InputError(
                        f"{name} row {row(k, i)}: token id {bad} is outside the vocabulary [0, {vocab_size})"
                    )
    if forget_ids is not None and holdout_ids is not None:
        first = {}
        for i, row_id in enumerate(forget_ids):
            first.setdefault(row_id, i)
        for j, row_id in enumerate(holdout_ids):
            if row_id in first:
                raise InputError(
                    f"{holdout_name} row {row(1, j)}: id {row_id!r} is also {forget_name} row {row(0, first[row_id])} "
                    "(the holdout must be text the model never saw)"
                )
    seen = {}
    for i, seq in enumerate(forget):
        seen.setdefault(tuple(seq), i)
    for j, seq in enumerate(holdout):
        if tuple(seq) in seen:
            raise InputError(
                f"{holdout_name} row {row(1, j)}: same text as {forget_name} row {row(0, seen[tuple(seq)])} "
                "(a sequence cannot be both forgotten and never seen)"
            )


def sequence_bytes(tokens: Sequence[int], tokenizer=None) -> bytes:
    """What the zlib score compresses: the scored tokens decoded with ``tokenizer`` as UTF-8 (so
    text rows and ``input_ids`` rows alike, after any truncation), or without a tokenizer the
    token ids' own bytes (``mia.token_bytes``, little-endian int32)."""
    if tokenizer is None:
        return token_bytes(tokens)
    return tokenizer.decode(list(tokens), skip_special_tokens=False).encode("utf-8")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def membership_and_sampling(
    model,
    sequences: Sequence[Sequence[int]],
    settings: AuditSettings,
    data_bytes: Callable[[Sequence[int]], bytes],
    prompts: Sequence[int] | None = None,
) -> list[dict]:
    """Per sequence the four membership scores and the sampling-extraction figures, from one
    teacher-forced pass sharded over ranks (every rank runs the same number of forward calls:
    ``distributed.shard_indices``) and gathered in order on every rank. Collective. A row with a
    prompt of P tokens (``prompts``) is scored on its response: the membership scores over the
    positions predicting it (and ``data_bytes`` of it), sampling extraction from the prompt as
    the prefix (``prefix_length`` is then P)."""
    processors = decoding_processors(settings.temperature, settings.top_k, settings.top_p)
    prompts = list(prompts) if prompts is not None else [0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        shard = D.shard_indices(len(sequences))
        local_rows, local_prompts = [sequences[i] for i in shard], [prompts[i] for i in shard]
        local = []
        for batch, batch_prompts in zip(
            _chunks(local_rows, settings.batch_size), _chunks(local_prompts, settings.batch_size)
        ):
            for seq, prompt, stats in zip(batch, batch_prompts, token_statistics(model, batch, processors)):
                cut = scored_start(prompt)
                logp, mu, sigma = stats["logp"][cut:], stats["mu"][cut:], stats["sigma"][cut:]
                row = mia_scores(logp, mu, sigma, data_bytes(seq[prompt:]), settings.min_k)
                row.update(
                    extraction_figures(
                        stats["logq"],
                        prompt or settings.prefix_length,
                        settings.suffix_length,
                        settings.attack_samples,
                        settings.attack_confidence,
                    )
                )
                local.append(row)
    finally:
        model.train(was_training)
    return D.gather_shards(local, len(sequences))


def sequence_losses(
    model,
    sequences: Sequence[Sequence[int]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    prompts: Sequence[int] | None = None,
) -> list[float]:
    """Per sequence the mean next-token NLL (nats per token, from fp32 log-probabilities
    whatever the model's dtype; over the response of a row with a prompt, ``prompts``), from one
    teacher-forced pass (``passes.token_statistics``) sharded over ranks like
    ``membership_and_sampling`` and gathered in order on every rank: what the reference-model
    attack needs of the reference. Collective."""
    prompts = list(prompts) if prompts is not None else [0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        shard = D.shard_indices(len(sequences))
        local_rows, local_prompts = [sequences[i] for i in shard], [prompts[i] for i in shard]
        local = []
        for batch, batch_prompts in zip(_chunks(local_rows, batch_size), _chunks(local_prompts, batch_size)):
            stats = token_statistics(model, batch)
            local += [-float(np.mean(s["logp"][scored_start(p) :])) for s, p in zip(stats, batch_prompts)]
    finally:
        model.train(was_training)
    return D.gather_shards(local, len(sequences))


def _has_prompts(*sets) -> bool:
    return any(getattr(data, "prompt_lengths", None) is not None for data in sets)


def _is_model(obj) -> bool:
    return hasattr(obj, "config") and callable(obj)


def _check_companion(option: str, companion, model, count: int) -> None:
    """A reference or retrained model shares the audited model's vocabulary; precomputed figures
    cover every audited sequence. Raises InputError (one line)."""
    if _is_model(companion):
        mine, theirs = getattr(model.config, "vocab_size", None), getattr(companion.config, "vocab_size", None)
        if mine != theirs:
            raise InputError(
                f"{param(option)}: vocabulary of {theirs} tokens, but the audited model's has {mine} "
                "(it must share the audited model's tokenizer)"
            )
    elif isinstance(companion, AuditResult):
        if len(companion.rows) != count:
            raise InputError(f"{param(option)}: its audit covers {len(companion.rows)} sequences, this one {count}")
    elif len(companion) != count:
        raise InputError(f"{param(option)}: {len(companion)} reference losses for {count} sequences")


def verdict(row: dict, thresholds: Thresholds) -> str:
    """The one verdict of a sequence (module docstring): ``Thresholds.sides`` over its ``band_on``
    scores (skipped when the row lacks one: an audit without greedy scoring has no MA), and
    ``discoverable``."""
    judged = all(s in row for s in thresholds.band_on)
    side = int(thresholds.sides([row])[0]) if judged else IN_BAND
    if side == MEMORIZED:
        return "memorized"
    if row["discoverable"]:
        return "discoverable"
    if side == OVER_UNLEARNED:
        return "over-unlearned"
    return "unseen-like"


def _finite_stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "median": float(np.median(arr)) if arr.size else None,
        "max": float(arr.max()) if arr.size else None,
        "finite_mean": float(finite.mean()) if finite.size else None,
        "zero_probability": int(np.count_nonzero(np.isneginf(arr))),
    }


def summarize_audit(rows: list[dict], settings: AuditSettings, thresholds: Thresholds) -> dict:
    """``audit.json``'s figures: per set the greedy summary (``summarize_scores``), verdict counts,
    sampling figures; per membership score (``attacks(rows)``: ``MIA_SCORES``, and ``ref`` when
    the rows have it) the AUC forget vs holdout with its bootstrap interval and two-sided reading
    (``mia``), and the TPR at each of ``mia.TPR_FPRS`` with its interval (``tpr_at_fpr``)."""
    by_set = {name: [r for r in rows if r["set"] == name] for name in SETS}
    scores = attacks(rows)
    out: dict[str, Any] = {"settings": asdict(settings), "thresholds": thresholds.summary()}
    greedy_keys = ("n_tokens", "loss", "ma", "max_verbatim")
    for name, set_rows in by_set.items():
        part: dict[str, Any] = {"count": len(set_rows)}
        if settings.greedy:
            greedy = [
                {k: v for k, v in r.items() if k in greedy_keys or k.startswith(("el_", "extractable_"))}
                for r in set_rows
            ]
            part["greedy"] = summarize_scores(greedy, thresholds)
        part["verdicts"] = {v: sum(r["verdict"] == v for r in set_rows) for v in VERDICTS}
        part["sampling"] = {
            "discoverable": int(sum(bool(r["discoverable"]) for r in set_rows)),
            "log10_p": _finite_stats([r["log10_p"] for r in set_rows]),
        }
        part["mia_means"] = {s: float(np.mean([r[s] for r in set_rows])) for s in scores}
        out[name] = part
    mia, tpr = {}, {}
    for i, score in enumerate(scores):
        member = [r[score] for r in by_set["forget"]]
        nonmember = [r[score] for r in by_set["holdout"]]
        interval = roc_auc_interval(member, nonmember, settings.bootstrap, settings.seed + i)
        ci95 = list(interval) if interval else None
        auc = roc_auc(member, nonmember)
        mia[score] = {"auc": auc, "ci95": ci95, **two_sided(auc, ci95)}
        # The same seed as the AUC's interval: the same bootstrap draws.
        tpr[score] = tpr_at_fpr_figures(member, nonmember, resamples=settings.bootstrap, seed=settings.seed + i)
    out["mia"] = mia
    out["tpr_at_fpr"] = tpr
    return out


def attacks(rows: list[dict]) -> tuple[str, ...]:
    """The membership scores the rows carry: ``MIA_SCORES``, then ``ref`` with a reference model."""
    return (*MIA_SCORES, REF_SCORE) if rows and REF_SCORE in rows[0] else MIA_SCORES


def retrained_figures(result: AuditResult, retrained: AuditResult) -> dict:
    """What an audit says against a model retrained without the forget set (the gold standard of
    TOFU and MUSE), both audited on the same forget and holdout sets: ``mia_retrained`` (each
    attack's AUC and interval under the retrained model), ``tpr_at_fpr_retrained`` (its TPR at
    each low FPR with intervals: what a TPR under the audited model is read against),
    ``privleak`` (MUSE's PrivLeak per attack, percent, ``mia.privleak``), ``auc_difference``
    (per attack, AUC - AUC_retrained with a paired bootstrap interval over the same records,
    ``mia.auc_difference``: whether the attack can tell the two models' forget sets apart) and
    ``forget_quality`` (the KS-test p-value between the
    forget set's per-sequence losses under the audited and the retrained model,
    ``mia.forget_quality``; ``forget_quality_ks`` holds the statistic too). Raises ValueError when
    the two audits' forget or holdout rows differ (ids or order)."""
    scores = [s for s in result.summary["mia"] if s in retrained.summary["mia"]]
    theirs = retrained.summary["mia"]
    losses = {name: [r["loss"] for r in res.set_rows("forget")] for name, res in (("a", result), ("r", retrained))}
    ks = forget_quality(losses["a"], losses["r"])
    sets = {name: (result.set_rows(name), retrained.set_rows(name)) for name in ("forget", "holdout")}
    for name, (ours, retrained_rows) in sets.items():
        if [r["id"] for r in ours] != [r["id"] for r in retrained_rows]:
            raise ValueError(f"retrained_figures: the {name} rows of the two audits differ (ids or order)")
    settings = result.settings

    def difference(i: int, score: str) -> dict:
        (fa, fr), (ha, hr) = ([[r[score] for r in rows] for rows in pair] for pair in sets.values())
        return auc_difference(fa, ha, fr, hr, settings.bootstrap, settings.seed + i)

    return {
        "mia_retrained": {s: theirs[s] for s in scores},
        "tpr_at_fpr_retrained": {s: retrained.summary["tpr_at_fpr"][s] for s in scores},
        "privleak": {s: privleak(result.summary["mia"][s]["auc"], theirs[s]["auc"]) for s in scores},
        "auc_difference": {s: difference(i, s) for i, s in enumerate(scores)},
        "forget_quality": ks["pvalue"],
        "forget_quality_ks": {**ks, "score": "loss", "forget_count": len(losses["a"])},
    }


def audit(
    model,
    forget,
    holdout,
    *,
    settings: AuditSettings | None = None,
    thresholds: Thresholds | None = None,
    tokenizer=None,
    progress: bool = False,
    reference=None,
    retrained=None,
    prompt_lengths: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None),
    recalibrate: bool = False,
    **options,
) -> AuditResult:
    """Audit ``model`` (any Hugging Face causal LM) on a forget set against a holdout set.

    ``forget``, ``holdout``: ``core.data.SequenceSet`` (ids kept) or lists of token-id lists
    (ids = row index). Rows with a prompt (a set's ``prompt_lengths``, or for plain lists
    ``prompt_lengths``: the forget set's and the holdout's) are audited on their response: the
    greedy metrics as ``score_sequences(prompt_lengths=)``, the membership scores over the
    response, sampling extraction with the prompt as its prefix. ``settings``: an
    ``AuditSettings``, or its fields as keyword ``options``
    (``audit(model, f, h, top_k=40, prefix_length=32)``). ``thresholds``: MA verdict levels
    (default ``Thresholds()``: 0.60 / 0.15). ``tokenizer``: decodes tokens for the zlib score
    (without one, the token ids' bytes are compressed).

    ``reference``: a reference model with the same tokenizer (commonly the model before
    fine-tuning), or its per-sequence losses from ``sequence_losses`` (forget rows then holdout
    rows); adds the ``ref`` attack (``mia.ref_score``: loss minus the reference's loss) to every
    row and figure. ``retrained``: a model trained the same way without the forget set, or its
    ``AuditResult`` on the same sets (audited with the same ``reference``); adds
    ``retrained_figures`` to the summary (``mia_retrained``, ``privleak``, ``forget_quality``).
    Passing figures instead of models lets a caller load one model at a time.

    Verdicts judged by holdout position (``Thresholds.positional``) are placed among this audit's
    own non-members when ``thresholds`` holds no holdout values yet. ``recalibrate``: also when it
    does (thresholds calibrated under another model, e.g. the one before unlearning), so that the
    verdict reads "scores as this model scores text it never saw", the same question the AUCs
    ask. The summary's ``thresholds.calibrated_on_audit`` says whether the positions came from this
    audit's non-members. Judging MA by position this way needs ``greedy``.

    Returns an ``AuditResult``: per sequence (forget rows, then holdout rows) ``id``, ``set``,
    every ``score_sequences`` metric, ``zlib``, ``min_k``, ``min_k++``, their percentiles within
    the holdout (``{score}_pct``, 0-100), ``log10_p`` (float, ``-inf`` when p = 0),
    ``samples_50``, ``samples_99`` (float, ``inf`` when p = 0), ``discoverable`` (bool),
    ``outside_kept`` (int) and ``verdict``; and the summary (``summarize_audit``).
    Collective under a process group (every rank calls it with the same arguments and gets the
    same result). Raises InputError for bad settings or sets, or a reference / retrained model
    with another vocabulary, before any model compute.
    """
    settings = AuditSettings(**options) if settings is None else replace(settings, **options)
    settings.validate()
    thresholds = Thresholds(None, None) if thresholds is None else thresholds
    forget_ids, forget_seqs, forget_prompts = _as_sequences(forget, prompt_lengths[0])
    holdout_ids, holdout_seqs, holdout_prompts = _as_sequences(holdout, prompt_lengths[1])
    prompts = forget_prompts + holdout_prompts
    with_prompts = any(prompts) or any(p is not None for p in prompt_lengths) or _has_prompts(forget, holdout)
    if recalibrate and "ma" in thresholds.positional() and not settings.greedy:
        raise InputError("recalibrate: judging MA by holdout position needs greedy scoring (greedy=True)")
    if any(
        (recalibrate or s not in thresholds.holdout) and (s != "ma" or settings.greedy) for s in thresholds.positional()
    ):
        check_holdout_size(len(holdout_seqs), thresholds.score_quantile)
    explicit_ids = hasattr(forget, "sequences") and hasattr(holdout, "sequences")
    check_sets(
        forget_seqs,
        holdout_seqs,
        forget_ids if explicit_ids else None,
        holdout_ids if explicit_ids else None,
        settings.min_tokens(),
        getattr(model.config, "vocab_size", None),
        (forget_prompts, holdout_prompts),
        settings,
    )
    sequences = forget_seqs + holdout_seqs
    for option, companion in (("reference", reference), ("retrained", retrained)):
        if companion is not None:
            _check_companion(option, companion, model, len(sequences))
    if _is_model(reference):
        reference = sequence_losses(reference, sequences, settings.batch_size, prompts)
    if _is_model(retrained):
        retrained = audit(
            retrained,
            forget,
            holdout,
            settings=replace(settings, greedy=False),
            thresholds=thresholds,
            tokenizer=tokenizer,
            reference=reference,
            prompt_lengths=prompt_lengths,
        )
    if settings.greedy:
        greedy = score_sequences(
            model,
            sequences,
            el_n=settings.el_n,
            extract_k=settings.extract_k,
            batch_size=settings.batch_size,
            progress=progress,
            prompt_lengths=prompts if with_prompts else None,
        )
    else:
        greedy = [
            {"n_tokens": len(s) - p, **({"n_prompt_tokens": p} if with_prompts else {})}
            for s, p in zip(sequences, prompts)
        ]
    data_bytes = lambda seq: sequence_bytes(seq, tokenizer)
    extra = membership_and_sampling(model, sequences, settings, data_bytes, prompts)
    rows = []
    labels = [("forget", i) for i in forget_ids] + [("holdout", i) for i in holdout_ids]
    for (set_name, row_id), g, e in zip(labels, greedy, extra):
        # The greedy scorer's loss (when it ran) is the loss score: one number, one source.
        row = {"id": row_id, "set": set_name, **g}
        row.update({k: v for k, v in e.items() if k not in row})
        rows.append(row)
    if reference is not None:
        for row, reference_loss in zip(rows, reference):
            row[REF_SCORE] = ref_score(row["loss"], reference_loss)
    scores = attacks(rows)
    holdout_scores = {s: [r[s] for r in rows if r["set"] == "holdout"] for s in scores}
    holdout_rows = [r for r in rows if r["set"] == "holdout"]
    uncalibrated = any(s not in thresholds.holdout for s in thresholds.positional())
    recalibrated = bool(thresholds.positional()) and (uncalibrated or recalibrate)
    if recalibrated and all(s in holdout_rows[0] for s in thresholds.band_on):
        # Verdicts by position among this audit's own non-members (explicit levels win).
        thresholds = thresholds.calibrated(holdout_rows)
    else:
        recalibrated = False
    for row in rows:
        for score in scores:
            row[f"{score}_pct"] = percentile_in(row[score], holdout_scores[score])
        row["verdict"] = verdict(row, thresholds)
    result = AuditResult(rows, summarize_audit(rows, settings, thresholds), settings)
    result.summary["thresholds"]["calibrated_on_audit"] = recalibrated
    if retrained is not None:
        result.summary.update(retrained_figures(result, retrained))
    return result


def compare(after: AuditResult, before: AuditResult) -> AuditResult:
    """``after`` with the ``before`` audit (same sets, e.g. the model before unlearning) folded
    in: each row gains ``baseline`` (the before row's figures and verdict) and ``change`` (after
    minus before for ``CHANGE_KEYS``, and ``ref`` when there is a reference; None where either
    side is not finite), and the summary gains ``baseline`` (the before summary)."""
    old = {(r["set"], r["id"]): r for r in before.rows}
    rows = []
    for row in after.rows:
        prev = old[(row["set"], row["id"])]
        keys = [k for k in prev if k not in ("id", "set")]
        change = {}
        for k in (*CHANGE_KEYS, *([REF_SCORE] if REF_SCORE in row else [])):
            a, b = row.get(k), prev.get(k)
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b)
            change[k] = float(a - b) if ok else None
        rows.append({**row, "baseline": {k: prev[k] for k in keys}, "change": change})
    summary = {**after.summary, "baseline": {k: v for k, v in before.summary.items() if k != "settings"}}
    return AuditResult(rows, summary, after.settings)
