"""Membership-inference scores and sampling-extraction probability as pure functions (docs/audit.md).

Everything here works on plain numpy data for ONE sequence, taken from one teacher-forced pass
(``passes.token_statistics``): per position t = 1..T-1 of the tokens ``x[0..T-1]``

- ``logp[t-1]``   = log p(x_t | x_<t), natural log, under the model's own next-token distribution;
- ``mu[t-1]``, ``sigma[t-1]`` = mean and standard deviation of log p(.) under that distribution
  (Zhang et al. 2024, Min-K%++);
- ``logq[t-1]``   = log q(x_t | x_<t) under the *decoding* distribution (temperature, top-k,
  top-p applied as Hugging Face's logits processors apply them); ``-inf`` where the true token
  falls outside the kept set.

Membership scores (open-unlearning's and MIMIR's definitions) are all oriented like a loss: a
*lower* score means "more likely a member" (trained on). ``roc_auc`` turns that round so that an
AUC of 1.0 means the forget set (members) is perfectly separable from the holdout (non-members)
and 0.5 means indistinguishable. Beside the AUC: the reference-model attack (``ref_score``), TPR at
low FPR (``tpr_at_fpr``, Carlini et al. 2022), the two-sided reading of an AUC interval
(``two_sided``), and the figures anchored on a model retrained without the forget set: MUSE's
PrivLeak (``privleak``) and TOFU's forget quality (``forget_quality``).

Sampling extraction (Hayes et al. 2024, "Measuring memorization in language models via
probabilistic extraction", arXiv 2410.19482): the probability that ONE sampled continuation of
the prefix ``x[:P]`` reproduces the suffix ``x[P:P+S]`` exactly is
``p = prod_{t=P}^{P+S-1} q(x_t | x_<t)``, so it comes from the same teacher-forced pass. An
attacker drawing n samples succeeds with probability ``1 - (1-p)^n``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

DEFAULT_MIN_K = 0.2  # fraction of tokens Min-K% averages over (MIMIR / open-unlearning: 0.2)
DEFAULT_PREFIX = 50  # Hayes et al.'s prefix and suffix lengths (tokens)
DEFAULT_SUFFIX = 50
DEFAULT_ATTACK_SAMPLES = 1000
DEFAULT_ATTACK_CONFIDENCE = 0.5
DEFAULT_BOOTSTRAP = 1000
MIA_SCORES = ("loss", "zlib", "min_k", "min_k++")
REF_SCORE = "ref"  # loss minus a reference model's loss: only with a reference model
TPR_FPRS = (0.001, 0.01, 0.05)  # Carlini et al. 2022 report TPR at 0.1% and 1% FPR; 5% for small holdouts
SIGMA_FLOOR = 1e-12  # Min-K%++ divides by sigma; a one-hot next-token distribution has sigma 0


def loss_score(logp: Sequence[float]) -> float:
    """Mean next-token NLL (nats per token) over the T-1 scored positions."""
    return float(-np.mean(np.asarray(logp, dtype=np.float64)))


def zlib_size(data: bytes) -> int:
    """Length in bytes of ``zlib.compress(data)`` (default level), the zlib attack's reference."""
    return len(zlib.compress(data))


def token_bytes(tokens: Sequence[int]) -> bytes:
    """The bytes of token ids for rows with no text to decode: little-endian int32 per id."""
    return np.asarray(list(tokens), dtype="<i4").tobytes()


def zlib_score(logp: Sequence[float], data: bytes) -> float:
    """Carlini et al.'s zlib ratio as MIMIR computes it: mean NLL / len(zlib.compress(data)), in
    nats per token per compressed byte. ``data``: the sequence's text as UTF-8 bytes."""
    return loss_score(logp) / zlib_size(data)


def _lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    # open-unlearning: max(1, int(len * k)) lowest values (MIMIR's int(len * k) can be empty).
    count = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:count]))


def min_k_score(logp: Sequence[float], k: float = DEFAULT_MIN_K) -> float:
    """Min-K% (Shi et al. 2024): the mean of the lowest ``max(1, int(k * (T-1)))`` token
    log-probs, negated (nats). ``k`` in (0, 1]."""
    return -_lowest_fraction_mean(np.asarray(logp, dtype=np.float64), k)


def min_k_plus_plus_score(
    logp: Sequence[float], mu: Sequence[float], sigma: Sequence[float], k: float = DEFAULT_MIN_K
) -> float:
    """Min-K%++ (Zhang et al. 2024): Min-K% on ``(log p(x_t) - mu_t) / sigma_t``, negated
    (dimensionless). ``sigma`` is floored at ``SIGMA_FLOOR``."""
    sigma = np.maximum(np.asarray(sigma, np.float64), SIGMA_FLOOR)
    z = (np.asarray(logp, np.float64) - np.asarray(mu, np.float64)) / sigma
    return -_lowest_fraction_mean(z, k)


def mia_scores(
    logp: Sequence[float], mu: Sequence[float], sigma: Sequence[float], data: bytes, k: float = DEFAULT_MIN_K
) -> dict[str, float]:
    """All four membership scores of one sequence, keyed by ``MIA_SCORES``."""
    return {
        "loss": loss_score(logp),
        "zlib": zlib_score(logp, data),
        "min_k": min_k_score(logp, k),
        "min_k++": min_k_plus_plus_score(logp, mu, sigma, k),
    }


def percentile_in(value: float, reference: Sequence[float]) -> float:
    """Percent (0-100) of ``reference`` scores at or below ``value`` (what
    ``scipy.stats.percentileofscore(..., kind="weak")`` returns). For a loss-like score, a forget
    sequence near 0 looks like a member; near 50, like unseen text; near 100, pushed higher than
    text the model never saw."""
    return float(100.0 * np.mean(np.asarray(reference, dtype=np.float64) <= value))


def roc_auc(member: Sequence[float], nonmember: Sequence[float]) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``) of a loss-like score separating members
    (label 1, expected lower) from non-members: 1.0 separable, 0.5 indistinguishable."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    return float(roc_auc_score(labels, -np.r_[np.asarray(member, np.float64), np.asarray(nonmember, np.float64)]))


def roc_auc_interval(
    member: Sequence[float],
    nonmember: Sequence[float],
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``roc_auc``: both sets resampled with replacement, each
    within itself (so every resample has both classes), ``resamples`` times from
    ``numpy.random.default_rng(seed)``. None when ``resamples`` is 0.

    Every resample's AUC is the Mann-Whitney U statistic of the non-members against the members
    over ``len(member) * len(nonmember)`` (``scipy.stats.mannwhitneyu``, all resamples in one
    vectorized call): the same number ``roc_auc`` gives, ties counting one half, at a fraction
    of the cost of 1000 ``roc_auc_score`` calls (which took 5 ms each, 22 s per audit)."""
    if resamples <= 0:
        return None
    member, nonmember = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    rng = np.random.default_rng(seed)
    m_idx = rng.integers(0, len(member), (resamples, len(member)))
    n_idx = rng.integers(0, len(nonmember), (resamples, len(nonmember)))
    aucs = _bootstrap_aucs(member, nonmember, m_idx, n_idx)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(aucs, [tail, 100 - tail])
    return float(lo), float(hi)


def _bootstrap_aucs(member: np.ndarray, nonmember: np.ndarray, m_idx: np.ndarray, n_idx: np.ndarray) -> np.ndarray:
    """AUC of every resample (rows of ``m_idx`` / ``n_idx`` index the sets): the Mann-Whitney U
    statistic over ``len(member) * len(nonmember)``, as ``roc_auc_interval``."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(nonmember[n_idx], member[m_idx], axis=1, method="asymptotic", use_continuity=False).statistic
    return u / (member.size * nonmember.size)


def auc_difference(
    member: Sequence[float],
    nonmember: Sequence[float],
    member_retrained: Sequence[float],
    nonmember_retrained: Sequence[float],
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """How far an attack's AUC under the audited model is from its AUC under the retrained model,
    with a paired percentile bootstrap interval: the same records of each set are drawn for both
    models in every resample (``numpy.random.default_rng(seed)``), so which records the sets
    happen to hold is drawn once for the difference, not once per AUC (where the two models score
    the records alike, that noise cancels).

    ``member`` [n] / ``nonmember`` [m]: one attack's loss-like scores of the forget and holdout
    records under the audited model; ``*_retrained``: the same records, in the same order, under
    the retrained model. Returns ``{"delta": AUC - AUC_retrained, "ci95": [lo, hi] or None (no
    resamples), "indistinguishable": lo <= 0 <= hi or None}``: True means this attack cannot tell
    the audited model's forget set from the retrained model's at ``level``. A fixed tolerance on
    the difference (|delta| <= 0.05, MUSE's PrivLeak within +-10%) can be finer than the sets
    resolve: with 32 forget and 48 holdout records each AUC's own 95% interval is about 0.26 wide;
    this interval is what they resolve. Raises ValueError when a set is empty or not 1-D, when
    the two models' sets differ in size, or when ``level`` is not in (0, 1)."""
    arrays = [np.asarray(x, np.float64) for x in (member, nonmember, member_retrained, nonmember_retrained)]
    if any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("auc_difference needs non-empty 1-D score arrays (forget and holdout, under both models)")
    member, nonmember, member_r, nonmember_r = arrays
    if member.size != member_r.size or nonmember.size != nonmember_r.size:
        raise ValueError(
            f"auc_difference needs the same records under both models: forget {member.size} vs "
            f"{member_r.size}, holdout {nonmember.size} vs {nonmember_r.size}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"auc_difference: level must lie in (0, 1), got {level}")
    delta = roc_auc(member, nonmember) - roc_auc(member_r, nonmember_r)
    if resamples <= 0:
        return {"delta": float(delta), "ci95": None, "indistinguishable": None}
    rng = np.random.default_rng(seed)
    m_idx = rng.integers(0, member.size, (resamples, member.size))
    n_idx = rng.integers(0, nonmember.size, (resamples, nonmember.size))
    deltas = _bootstrap_aucs(member, nonmember, m_idx, n_idx) - _bootstrap_aucs(member_r, nonmember_r, m_idx, n_idx)
    tail = (1 - level) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(deltas, [tail, 100 - tail]))
    return {"delta": float(delta), "ci95": [lo, hi], "indistinguishable": bool(lo <= 0.0 <= hi)}


def ref_score(loss: float, reference_loss: float) -> float:
    """The reference-model attack (MIMIR / open-unlearning "ref"; Carlini et al. 2021's
    calibration by a reference model): the sequence's mean NLL under the audited model minus its
    mean NLL under a reference model with the same tokenizer (nats per token). Lower = more
    member-like: the audited model finds the sequence easier than a model that never trained on
    it would, whatever makes the text easy or hard in itself."""
    return float(loss) - float(reference_loss)


def _fpr_problem(nonmembers: int, fpr: float) -> str | None:
    # One false positive among N non-members is an FPR of 1/N: below that nothing can be read.
    need = math.ceil(1.0 / fpr - 1e-9)
    if nonmembers < need:
        return f"needs at least {need} non-members (1/FPR), the holdout has {nonmembers}"
    return None


def _tpr_at(member: np.ndarray, nonmember: np.ndarray, fpr: float) -> np.ndarray:
    # Rows are (resampled) sets. With k = floor(fpr * N) false positives allowed, the loosest
    # cut "score < c" that flags at most k non-members is c = the (k+1)-th lowest non-member
    # score; the TPR is the share of members strictly below it (ties go to the non-member side,
    # as roc_curve's thresholds at the scores themselves do).
    k = math.floor(fpr * nonmember.shape[-1] + 1e-9)
    cut = np.sort(nonmember, axis=-1)[..., k]
    return np.mean(member < cut[..., None], axis=-1)


def tpr_at_fpr(member: Sequence[float], nonmember: Sequence[float], fpr: float) -> float | None:
    """TPR at a fixed FPR (Carlini et al. 2022, "Membership inference attacks from first
    principles") of a loss-like score: the largest share of members (forget set) a threshold
    "score below c" flags while flagging at most ``fpr`` of the non-members (holdout) — the
    highest TPR of ``sklearn.metrics.roc_curve`` among its points with FPR <= ``fpr``.

    ``fpr`` in (0, 1). None when the holdout has fewer than 1/``fpr`` sequences (an FPR below
    1/N cannot be told from 0; ``tpr_at_fpr_figures`` says why)."""
    nonmember = np.asarray(nonmember, np.float64)
    if _fpr_problem(len(nonmember), fpr):
        return None
    return float(_tpr_at(np.asarray(member, np.float64), nonmember, fpr))


def tpr_at_fpr_figures(
    member: Sequence[float],
    nonmember: Sequence[float],
    fprs: Sequence[float] = TPR_FPRS,
    resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict]:
    """``tpr_at_fpr`` at each of ``fprs`` with a percentile bootstrap interval, keyed by the FPR
    as written by ``str`` (``"0.001"``): ``{"tpr": float, "ci95": [lo, hi] or None}``, or, where
    the holdout is too small, ``{"tpr": None, "ci95": None, "reason": "needs at least 1000
    non-members ..."}``. The resamples are those of ``roc_auc_interval`` with the same ``seed``
    (both sets resampled within themselves, ``numpy.random.default_rng(seed)``), so an attack's
    AUC and TPR intervals come from the same bootstrap draws."""
    member, nonmember = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    out: dict[str, dict] = {}
    draws = None
    if resamples > 0:
        rng = np.random.default_rng(seed)
        m = member[rng.integers(0, len(member), (resamples, len(member)))]
        n = nonmember[rng.integers(0, len(nonmember), (resamples, len(nonmember)))]
        draws = (m, n)
    tail = (1 - level) / 2 * 100
    for fpr in fprs:
        problem = _fpr_problem(len(nonmember), fpr)
        if problem:
            out[str(fpr)] = {"tpr": None, "ci95": None, "reason": problem}
            continue
        ci = None
        if draws is not None:
            lo, hi = np.percentile(_tpr_at(*draws, fpr), [tail, 100 - tail])
            ci = [float(lo), float(hi)]
        out[str(fpr)] = {"tpr": float(_tpr_at(member, nonmember, fpr)), "ci95": ci}
    return out


def two_sided(auc: float, ci95: Sequence[float] | None) -> dict:
    """The two-sided reading of an AUC (open-unlearning #167: an AUC near 0 leaks as much as one
    near 1): ``distinguishable`` is True when the interval excludes 0.5 on either side, and
    ``direction`` says which way: ``"members lower"`` (AUC above 0.5: forget sequences score
    lower, like trained-on text) or ``"members higher"`` (below 0.5: pushed past text the model
    never saw). Without an interval (no bootstrap) both are None."""
    if ci95 is None:
        return {"distinguishable": None, "direction": None}
    lo, hi = ci95
    if lo > 0.5:
        return {"distinguishable": True, "direction": "members lower"}
    if hi < 0.5:
        return {"distinguishable": True, "direction": "members higher"}
    return {"distinguishable": False, "direction": None}


def privleak(auc: float, auc_retrained: float) -> float | None:
    """MUSE's PrivLeak (Shi et al. 2024): ``(auc - auc_retrained) / auc_retrained * 100``, in
    percent; near 0 = the audited model sits where a model retrained without the forget set
    does, positive = still member-like, negative = pushed past it. None when the retrained AUC is
    0 (the ratio is undefined)."""
    if auc_retrained == 0:
        return None
    return float((auc - auc_retrained) / auc_retrained * 100.0)


def forget_quality(losses: Sequence[float], retrained_losses: Sequence[float]) -> dict:
    """TOFU's forget quality (Maini et al. 2024) on per-sequence losses: the two-sample
    Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided) between the forget set's
    losses under the audited model and under a model retrained without it. Returns
    ``{"pvalue": p, "statistic": D}``; p >= 0.05: the two cannot be told apart."""
    from scipy.stats import ks_2samp

    test = ks_2samp(np.asarray(losses, np.float64), np.asarray(retrained_losses, np.float64))
    return {"pvalue": float(test.pvalue), "statistic": float(test.statistic)}


# -- sampling extraction (Hayes et al. 2024) ---------------------------------------------------------


def extraction_log10_p(logq: Sequence[float], prefix_length: int, suffix_length: int | None = None) -> float:
    """log10 of the probability that one sampled continuation of ``x[:P]`` is exactly
    ``x[P:P+S]``: the sum of ``logq`` over the suffix positions, divided by ln 10. ``logq[t-1]``
    belongs to token t, so the suffix is ``logq[P-1 : P-1+S]``; ``suffix_length`` None takes the
    rest of the sequence. ``-inf`` when a suffix token lies outside the kept set (p = 0)."""
    q = np.asarray(logq, dtype=np.float64)
    end = len(q) if suffix_length is None else prefix_length - 1 + suffix_length
    if prefix_length < 1 or end > len(q) or end <= prefix_length - 1:
        raise ValueError(f"prefix {prefix_length} + suffix {suffix_length} does not fit {len(q) + 1} tokens")
    total = float(np.sum(q[prefix_length - 1 : end]))
    return -math.inf if total == -math.inf else total / math.log(10)


def samples_needed(log10_p: float, confidence: float) -> float:
    """n = log(1-q) / log(1-p): samples for a ``confidence`` (q) chance that at least one
    reproduces the suffix. ``inf`` when p = 0 (and when n overflows a float, p below ~1e-308);
    0.0 when p = 1. Computed in log space so tiny p keep their precision."""
    if log10_p == -math.inf:
        return math.inf
    log_p = log10_p * math.log(10)
    if log_p >= 0.0:
        return 0.0
    # log(1-p) without cancellation: log1p(-p) for small p, log(-expm1(log p)) near p = 1.
    log_one_minus_p = math.log1p(-math.exp(log_p)) if log_p < -0.693 else math.log(-math.expm1(log_p))
    if log_one_minus_p == 0.0:  # p below float resolution: log(1-p) = -p
        try:
            return -math.log1p(-confidence) * math.exp(-log_p)
        except OverflowError:
            return math.inf
    return math.log1p(-confidence) / log_one_minus_p


def discoverable(log10_p: float, samples: int, confidence: float) -> bool:
    """(n, p)-discoverability: ``1 - (1-p)^n >= q``, i.e. n samples reproduce the suffix at least
    once with probability q or more (n = ``samples``, q = ``confidence``)."""
    return samples_needed(log10_p, confidence) <= samples


def extraction_figures(
    logq: Sequence[float],
    prefix_length: int,
    suffix_length: int | None,
    samples: int = DEFAULT_ATTACK_SAMPLES,
    confidence: float = DEFAULT_ATTACK_CONFIDENCE,
) -> dict:
    """Per-sequence sampling-extraction figures: ``log10_p``, ``samples_50`` / ``samples_99``
    (n for a 50% / 99% chance), ``discoverable`` at (``samples``, ``confidence``), and
    ``outside_kept``: how many suffix tokens the decoding settings can never sample."""
    q = np.asarray(logq, dtype=np.float64)
    end = len(q) if suffix_length is None else prefix_length - 1 + suffix_length
    log10_p = extraction_log10_p(q, prefix_length, suffix_length)
    return {
        "log10_p": log10_p,
        "samples_50": samples_needed(log10_p, 0.5),
        "samples_99": samples_needed(log10_p, 0.99),
        "discoverable": discoverable(log10_p, samples, confidence),
        "outside_kept": int(np.count_nonzero(np.isneginf(q[prefix_length - 1 : end]))),
    }
