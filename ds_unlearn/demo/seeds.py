"""The demo's figures over several seeds: the "Against the retrained model" table of several
``ds-unlearn demo --seed N`` runs side by side, per model the mean and the range over seeds.

With 32 forget records one record moves an AUC by about 0.03 and the float kernels of another
machine move a run's figures, so a recommendation is worded to survive the range printed here,
not one run's number. ``bench/demo_seeds.py`` runs the seeds and prints ``spread_table``.
"""

from __future__ import annotations

import numpy as np

from .report import ATTACKS, RETRAINED_ROW, against_retrained

# (figure key, column title, format) of the spread table; "gap" is max |AUC - AUC_retrained| of the same seed.
COLUMNS = (
    ("memorized", "memorized", "{:.1f}"),
    ("over_unlearned", "over-unlearned", "{:.1f}"),
    *((f"auc_{a}", f"{a} AUC", "{:.3f}") for a in ATTACKS),
    ("gap", "max abs ΔAUC vs retrained", "{:.3f}"),
    ("at_retrained", "attacks at the retrained model (paired 95%)", "{:.1f}"),
    ("forget_quality", "forget quality", "{:.3f}"),
    ("ppl_change", "holdout ppl change %", "{:+.1f}"),
    ("retain_ma", "retain MA", "{:.3f}"),
)


def seed_figures(reports: list[dict]) -> dict[str, list[dict]]:
    """Per row of ``against_retrained`` found in every report (the retrained model first, then
    the methods by report key), one flat dict per report, in order: its figures with each attack's
    AUC as ``auc_{attack}`` and ``gap``, the largest |AUC - AUC_retrained| over the attacks against
    the same run's retrained model, and ``at_retrained``, how many attacks cannot tell its forget
    set from the retrained model's (paired 95% interval, None for the retrained row). ``reports``:
    ``DIR/report.json`` dicts of ``ds-unlearn demo`` runs (one per seed). Raises ValueError when a
    report has no retrained audit."""
    tables = []
    for report in reports:
        table = against_retrained(report["methods"], report["planting"])
        if not table:
            raise ValueError(f"{report['demo']['output_dir']}: no retrained audit in its report")
        tables.append(table)
    common = [key for key in tables[0] if all(key in t for t in tables)]
    out = {}
    for key in common:
        rows = []
        for table in tables:
            f, truth = table[key], table[RETRAINED_ROW]["auc"]
            gaps = [abs(f["auc"][a] - truth[a]) for a in ATTACKS if f["auc"][a] is not None and truth[a] is not None]
            rows.append(
                {
                    "title": f["title"],
                    **{k: v for k, v in f.items() if k not in ("auc", "privleak", "title", "tpr", "indistinguishable")},
                    "at_retrained": None if f["indistinguishable"] is None else len(f["indistinguishable"]),
                    **{f"auc_{a}": f["auc"][a] for a in ATTACKS},
                    "gap": max(gaps) if gaps else None,
                }
            )
        out[key] = rows
    return out


def spread(values: list) -> tuple[float, float, float] | None:
    """(mean, min, max) of the values that are not None; None when none is."""
    present = [float(v) for v in values if v is not None]
    return (float(np.mean(present)), min(present), max(present)) if present else None


def spread_table(reports: list[dict]) -> list[str]:
    """Markdown: one row per model (``seed_figures``), each cell "mean (min to max)" over the
    reports' seeds."""
    seeds = [r["demo"]["settings"]["seed"] for r in reports]
    header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [f"Over seeds {', '.join(map(str, seeds))}: mean (min to max).", "", header]
    lines.append("|---|" + "---|" * len(COLUMNS))
    for rows in seed_figures(reports).values():
        cells = []
        for key, _, fmt in COLUMNS:
            s = spread([r[key] for r in rows])
            cells.append("n/a" if s is None else f"{fmt.format(s[0])} ({fmt.format(s[1])} to {fmt.format(s[2])})")
        lines.append(f"| {rows[0]['title']} | " + " | ".join(cells) + " |")
    return lines
