"""The one summary of a list of per-sequence scores, and the verdict thresholds it counts at.

Used by ``score`` (its ``.summary.json``), the unlearning report, the demo and the lab, so a
"memorized" count means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA, verdict_counts

HISTOGRAM_BINS = 10
CALIBRATION_QUANTILE = 0.05  # memorized above the holdout's 95th percentile MA, over-unlearned below its 5th


@dataclass(frozen=True)
class Thresholds:
    """Verdict levels on memorization accuracy (MA, a fraction in [0, 1]).

    ``memorized_ma``: a sequence at or above it is still memorized; ``over_unlearned_ma``: at or
    below it, pushed suspiciously low (the ICML 2024 code: 0.60 / 0.15). ``mean_ma``: the level of
    the papers' ``mean`` stop rule (Jang et al. 2023), None when unused."""

    memorized_ma: float = MEMORIZED_MA
    over_unlearned_ma: float = OVER_UNLEARNED_MA
    mean_ma: float | None = None


def add_threshold_flags(add) -> None:
    """The verdict flags ``--memorized_threshold`` and ``--over_unlearned_threshold`` (MA levels),
    added with ``add`` (an argparse parser's ``add_argument``); read them with ``thresholds_from``."""
    add("--memorized_threshold", type=float, default=MEMORIZED_MA, help="MA at or above which: memorized")
    add("--over_unlearned_threshold", type=float, default=OVER_UNLEARNED_MA, help="MA at or below: over-unlearned")


def thresholds_from(args) -> Thresholds:
    """``Thresholds`` from the flags of ``add_threshold_flags``. Raises InputError unless
    0 <= over_unlearned < memorized <= 1."""
    if not 0.0 <= args.over_unlearned_threshold < args.memorized_threshold <= 1.0:
        raise InputError("--memorized_threshold: need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
    return Thresholds(args.memorized_threshold, args.over_unlearned_threshold)


def calibrate_thresholds(holdout_ma: Sequence[float], quantile: float) -> Thresholds:
    """Thresholds from text the model never saw: a sequence is memorized above the holdout's
    upper ``1-quantile`` MA, over-unlearned below its lower ``quantile`` MA (where a membership
    attack would spot it), and the mean rule stops at the holdout's mean MA (Jang et al.).

    ``holdout_ma``: per-sequence MA of the holdout set (floats in [0, 1]); ``quantile`` in (0, 0.5).
    Raises ValueError on an empty holdout."""
    ma = np.asarray(holdout_ma, dtype=np.float64)
    if ma.size == 0:
        raise ValueError("calibrate_thresholds needs at least one holdout score")
    return Thresholds(
        memorized_ma=float(np.quantile(ma, 1 - quantile)),
        over_unlearned_ma=float(np.quantile(ma, quantile)),
        mean_ma=float(ma.mean()),
    )


def metric_means(scores: list[dict]) -> dict[str, float]:
    """Mean of every numeric metric (booleans give the fraction that is True); ``id`` excluded."""
    keys = [k for k, v in scores[0].items() if isinstance(v, (int, float)) and k != "id"]
    return {k: float(np.mean([float(s[k]) for s in scores])) for k in keys}


def ma_histogram(scores: list[dict], bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of per-sequence MA in ``bins`` equal bins over [0, 1]."""
    counts, edges = np.histogram([s["ma"] for s in scores], bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def summarize_scores(scores: list[dict], thresholds: Thresholds | None = None) -> dict:
    """Counts, verdicts, means and an MA histogram of per-sequence score dicts (as
    ``score_sequences`` returns them; an ``id`` key is ignored). Raises ValueError if empty."""
    if not scores:
        raise ValueError("summarize_scores needs at least one score")
    t = thresholds or Thresholds()
    out = {
        "count": len(scores),
        "thresholds": {"memorized_ma": t.memorized_ma, "over_unlearned_ma": t.over_unlearned_ma},
        **verdict_counts([s["ma"] for s in scores], t.memorized_ma, t.over_unlearned_ma),
        "extractable": {k: int(sum(bool(s[k]) for s in scores)) for k in scores[0] if k.startswith("extractable_")},
        "means": metric_means(scores),
        "ma_histogram": ma_histogram(scores),
    }
    if "max_verbatim" in scores[0]:
        out["max_verbatim_max"] = int(max(int(s["max_verbatim"]) for s in scores))
    return out


def summary_lines(summary: dict) -> list[str]:
    """A few human lines for stdout (counts and means only: never any text)."""
    means = summary["means"]
    el = ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k.startswith("el_"))
    extract = ", ".join(f"{k[len('extractable_') :]} {v}" for k, v in summary["extractable"].items())
    t = summary["thresholds"]
    lines = [
        f"{summary['count']} sequences: mean ma {means['ma']:.3f}, mean loss {means['loss']:.3f}"
        + (f", {el}" if el else ""),
        f"memorized (ma >= {t['memorized_ma']}): {summary['memorized']}; "
        f"over-unlearned (ma <= {t['over_unlearned_ma']}): {summary['over_unlearned']}",
    ]
    if "max_verbatim" in means:
        lines.append(f"extractable: {extract}; longest verbatim run: mean {means['max_verbatim']:.1f} tokens")
    return lines
