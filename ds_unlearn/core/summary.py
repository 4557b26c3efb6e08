"""The one summary of a list of per-sequence scores, and the verdict thresholds it counts at.

Used by ``score`` (its ``.summary.json``), the unlearning report, the demo and the lab, so a
"memorized" count means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError, param
from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from .verdict import CALIBRATION_QUANTILE, MAX_QUANTILE, Thresholds, parse_band_on

__all__ = [
    "CALIBRATION_QUANTILE",
    "Thresholds",
    "calibrate_thresholds",
    "summarize_scores",
    "summary_lines",
    "thresholds_for",
]

HISTOGRAM_BINS = 10


def thresholds_for(
    memorized: float | None = None,
    over_unlearned: float | None = None,
    band_on: str | Sequence[str] = "ma",
    quantile: float = CALIBRATION_QUANTILE,
    calibrate: bool = False,
) -> Thresholds:
    """The verdict ``Thresholds`` of the settings ``memorized_threshold``,
    ``over_unlearned_threshold`` (MA levels), ``band_on`` and ``calibration_quantile``: a side
    given explicitly is a level; an unset side is judged by holdout position when ``calibrate``
    (the caller then calls ``Thresholds.calibrated``), else the ICML code's fixed level. Raises
    InputError naming the setting unless 0 <= over_unlearned < memorized <= 1, for scores other
    than ma without ``calibrate``, for a quantile outside (0, MAX_QUANTILE], and for MA levels
    when ``band_on`` leaves out ma."""
    given_memorized, given_over = memorized, over_unlearned
    if not calibrate:
        memorized = MEMORIZED_MA if memorized is None else memorized
        over_unlearned = OVER_UNLEARNED_MA if over_unlearned is None else over_unlearned
    if memorized is not None and over_unlearned is not None and not 0.0 <= over_unlearned < memorized <= 1.0:
        raise InputError("need 0 <= over_unlearned_threshold < memorized_threshold <= 1", field="memorized_threshold")
    scores = parse_band_on(band_on)
    if "ma" not in scores and not calibrate:
        raise InputError("scores other than ma are judged against a holdout", field="band_on")
    if not (isinstance(quantile, float) and 0.0 < quantile <= MAX_QUANTILE):
        raise InputError(f"must lie in (0, {MAX_QUANTILE}], got {quantile}", field="calibration_quantile")
    if "ma" not in scores:  # no MA verdict: levels given for it would be read by nothing
        if given_memorized is not None or given_over is not None:
            raise InputError(
                f"MA levels are read only when {param('band_on')} includes ma", field="memorized_threshold"
            )
        memorized = over_unlearned = None
    return Thresholds(memorized, over_unlearned, None, scores, quantile)


def calibrate_thresholds(
    holdout_rows: Sequence[dict], quantile: float = CALIBRATION_QUANTILE, band_on: Sequence[str] = ("ma",)
) -> Thresholds:
    """Thresholds judged wholly by position among text the model never saw (``core.verdict``):
    ``holdout_rows`` are its per-sequence score dicts (every ``band_on`` score, and ``ma`` for the
    mean rule's level, the holdout's mean MA as in Jang et al.). Raises InputError when the holdout
    is too small for ``quantile`` (``verdict.min_holdout_rows``)."""
    return Thresholds(None, None, None, tuple(band_on), quantile).calibrated(list(holdout_rows))


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
        "thresholds": t.summary(),
        **t.counts(scores),
        "verdict_rule": t.describe(),
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
    lines = [
        f"{summary['count']} sequences: mean ma {means['ma']:.3f}, mean loss {means['loss']:.3f}"
        + (f", {el}" if el else ""),
        f"memorized: {summary['memorized']}; over-unlearned: {summary['over_unlearned']} ({summary['verdict_rule']})",
    ]
    if "max_verbatim" in means:
        lines.append(f"extractable: {extract}; longest verbatim run: mean {means['max_verbatim']:.1f} tokens")
    return lines
