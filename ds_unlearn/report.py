"""Summaries of per-sequence scores: counts, means, verdicts at thresholds, an MA histogram."""

from __future__ import annotations

import numpy as np

from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA, verdict_counts

HISTOGRAM_BINS = 10


def metric_means(scores: list[dict]) -> dict[str, float]:
    """Mean of every numeric metric (booleans give the fraction that is True)."""
    keys = [k for k, v in scores[0].items() if isinstance(v, (int, float)) and k != "id"]
    return {k: float(np.mean([float(s[k]) for s in scores])) for k in keys}


def ma_histogram(scores: list[dict], bins: int = HISTOGRAM_BINS) -> dict:
    counts, edges = np.histogram([s["ma"] for s in scores], bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def summarize_scores(
    scores: list[dict],
    memorized_at: float = MEMORIZED_MA,
    over_unlearned_at: float = OVER_UNLEARNED_MA,
) -> dict:
    return {
        "count": len(scores),
        "thresholds": {"memorized_ma": memorized_at, "over_unlearned_ma": over_unlearned_at},
        **verdict_counts([s["ma"] for s in scores], memorized_at, over_unlearned_at),
        "extractable": {
            k: int(sum(bool(s[k]) for s in scores)) for k in scores[0] if k.startswith("extractable_")
        },
        "means": metric_means(scores),
        "ma_histogram": ma_histogram(scores),
    }


def summary_lines(summary: dict) -> list[str]:
    """A few human lines for stdout."""
    means = summary["means"]
    el = ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k.startswith("el_"))
    extract = ", ".join(f"{k[len('extractable_'):]} {v}" for k, v in summary["extractable"].items())
    t = summary["thresholds"]
    return [
        f"{summary['count']} sequences: mean ma {means['ma']:.3f}, mean loss {means['loss']:.3f}"
        + (f", {el}" if el else ""),
        f"memorized (ma >= {t['memorized_ma']}): {summary['memorized']}; "
        f"over-unlearned (ma <= {t['over_unlearned_ma']}): {summary['over_unlearned']}",
        f"extractable: {extract}; longest verbatim run: mean {means['max_verbatim']:.1f} tokens",
    ]
