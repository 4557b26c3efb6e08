"""The one summary of a list of per-sequence scores, and the verdict thresholds it counts at.

Used by ``score`` (its ``.summary.json``), the unlearning report, the demo and the lab, so a
"memorized" count means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from .verdict import CALIBRATION_QUANTILE, MAX_QUANTILE, Thresholds, parse_band_on

__all__ = ["CALIBRATION_QUANTILE", "Thresholds", "calibrate_thresholds", "summarize_scores", "summary_lines"]

HISTOGRAM_BINS = 10


def add_threshold_flags(add, calibrate: bool = False) -> None:
    """The verdict flags ``--memorized_threshold`` and ``--over_unlearned_threshold`` (MA levels),
    added with ``add`` (an argparse parser's ``add_argument``); read them with ``thresholds_from``.
    Unset, a side is calibrated on the holdout where the command has one (``calibrate``: also
    ``--band_on`` and ``--calibration_quantile``), else the ICML code's fixed level."""
    add(
        "--memorized_threshold",
        type=float,
        default=None,
        help=f"MA at or above which: memorized (default: calibrated on a holdout, else {MEMORIZED_MA})",
    )
    add(
        "--over_unlearned_threshold",
        type=float,
        default=None,
        help=f"MA at or below which: over-unlearned (default: calibrated on a holdout, else {OVER_UNLEARNED_MA})",
    )
    if calibrate:
        add(
            "--band_on",
            default="ma",
            help="comma list of scores judged by position among the holdout (ma, loss, zlib, min_k, min_k++)",
        )
        add(
            "--calibration_quantile",
            type=float,
            default=CALIBRATION_QUANTILE,
            help="per side: outside the holdout's central 1-2q by mid-rank position (needs ceil(1/q) holdout rows)",
        )


def thresholds_from(args, calibrate: bool = False) -> Thresholds:
    """``Thresholds`` from the flags of ``add_threshold_flags``: a side given explicitly is a
    level; an unset side is judged by holdout position when ``calibrate`` (the caller then calls
    ``Thresholds.calibrated``), else the fixed level. Raises InputError unless
    0 <= over_unlearned < memorized <= 1."""
    memorized, over = args.memorized_threshold, args.over_unlearned_threshold
    if not calibrate:
        memorized = MEMORIZED_MA if memorized is None else memorized
        over = OVER_UNLEARNED_MA if over is None else over
    if memorized is not None and over is not None and not 0.0 <= over < memorized <= 1.0:
        raise InputError("--memorized_threshold: need 0 <= over_unlearned_threshold < memorized_threshold <= 1")
    band_on = parse_band_on(getattr(args, "band_on", "ma"))
    if "ma" not in band_on and not calibrate:
        raise InputError("--band_on: scores other than ma are judged against a holdout")
    quantile = getattr(args, "calibration_quantile", CALIBRATION_QUANTILE)
    if not (isinstance(quantile, float) and 0.0 < quantile <= MAX_QUANTILE):
        raise InputError(f"--calibration_quantile: must lie in (0, {MAX_QUANTILE}], got {quantile}")
    if "ma" not in band_on:  # no MA verdict: levels given for it would be read by nothing
        if args.memorized_threshold is not None or args.over_unlearned_threshold is not None:
            raise InputError("--memorized_threshold: MA levels are read only when --band_on includes ma")
        memorized = over = None
    return Thresholds(memorized, over, None, band_on, quantile)


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
