"""An audit's files: ``audit.jsonl`` (per sequence, by id), ``audit.json`` (summary),
``audit.md`` (a short report a person can read) and two plots (matplotlib, Agg backend).

No text is ever written: rows carry ids and numbers only. JSON follows Python's ``json``
convention for non-finite floats: ``log10_p`` of a suffix the decoding settings can never
sample is ``-Infinity`` (p = 0) and the samples it needs ``Infinity``; ``json.loads`` and pandas
read them back as floats.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .audit import MIA_SCORES, SETS, VERDICTS, AuditResult
from .files import write_json, write_jsonl

JSONL, SUMMARY, MARKDOWN = "audit.jsonl", "audit.json", "audit.md"
PLOTS = {
    "mia_histograms.png": "Forget vs holdout histograms of each membership score",
    "log10p_vs_ma.png": "Per sequence: log10 p of sampling extraction against greedy MA",
}
AUDIT_OUTPUTS = (JSONL, SUMMARY, MARKDOWN, *PLOTS)
COLORS = {"forget": "tab:red", "holdout": "tab:blue"}


def write_audit(out_dir: str | Path, result: AuditResult, plots: bool = True) -> list[Path]:
    """Write every output of ``result`` into ``out_dir`` (created); returns the paths written.
    Call on one rank only; the caller has checked the directory (``files.check_output``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / JSONL, result.rows)
    write_json(out / SUMMARY, result.summary)
    written = [out / JSONL, out / SUMMARY]
    if plots:
        written += write_plots(out, result)
    (out / MARKDOWN).write_text(markdown(result))
    return [*written, out / MARKDOWN]


# -- markdown ---------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "-inf" if x < 0 else "inf"
    text = f"{x:.{digits}f}"
    # A log10 p of -1e-6 (p just below 1) rounds to "-0.0": the sign says nothing at this precision.
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def _n(x) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "never"
    return f"{x:.3g}"


def _auc(entry: dict) -> str:
    ci = entry.get("ci95")
    return _f(entry["auc"]) + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "")


def markdown(result: AuditResult) -> str:
    s, st = result.summary, result.summary["settings"]
    t = s["thresholds"]
    suffix = "the rest of each sequence" if st["suffix_length"] is None else f"the next {st['suffix_length']} tokens"
    decoding = f"temperature {st['temperature']}, top-k {st['top_k'] or 'off'}, top-p {st['top_p'] or 'off'}"
    lines = [
        "# ds-unlearn audit",
        "",
        f"Model: `{s.get('model', 'n/a')}`. {s['forget']['count']} forget and {s['holdout']['count']} holdout "
        "sequences (named by id only). Verdicts: memorized if MA ≥ "
        f"{_f(t['memorized_ma'])}, discoverable if {st['attack_samples']} samples reproduce the suffix with "
        f"probability ≥ {st['attack_confidence']}, over-unlearned if MA ≤ {_f(t['over_unlearned_ma'])}, "
        "else unseen-like.",
        "",
        "## Verdicts",
        "",
        "| set | " + " | ".join(VERDICTS) + " |",
        "|---|" + "---|" * len(VERDICTS),
    ]
    for name in SETS:
        lines.append(f"| {name} | " + " | ".join(str(s[name]["verdicts"][v]) for v in VERDICTS) + " |")
    lines += [
        "",
        "## Membership inference: forget (members) vs holdout (never seen)",
        "",
        "ROC AUC of each score (sklearn), 95% bootstrap interval in brackets; 0.5 = indistinguishable, "
        "1.0 = every forget sequence looks trained on.",
        "",
        "| score | AUC [95% CI] | forget mean | holdout mean |" + (" AUC before |" if "baseline" in s else ""),
        "|---|---|---|---|" + ("---|" if "baseline" in s else ""),
    ]
    for score in MIA_SCORES:
        row = (
            f"| {score} | {_auc(s['mia'][score])} | {_n(s['forget']['mia_means'][score])} "
            f"| {_n(s['holdout']['mia_means'][score])} |"
        )
        if "baseline" in s:
            row += f" {_auc(s['baseline']['mia'][score])} |"
        lines.append(row)
    lines += [
        "",
        "## Extraction under sampling (Hayes et al. 2024)",
        "",
        f"p = probability that one sampled continuation of the first {st['prefix_length']} tokens is exactly "
        f"{suffix} ({decoding}).",
        "",
        "| set | discoverable | median log10 p | max log10 p | p = 0 (outside the kept set) |",
        "|---|---|---|---|---|",
    ]
    for name in SETS:
        sp = s[name]["sampling"]
        lines.append(
            f"| {name} | {sp['discoverable']} of {s[name]['count']} | {_f(sp['log10_p']['median'], 1)} "
            f"| {_f(sp['log10_p']['max'], 1)} | {sp['log10_p']['zero_probability']} |"
        )
    if "greedy" in s["forget"]:
        lines += ["", "## Greedy memorization (as `ds-unlearn score`)", "", "| set | memorized | mean MA | mean loss |"]
        lines.append("|---|---|---|---|")
        for name in SETS:
            g = s[name]["greedy"]
            lines.append(f"| {name} | {g['memorized']} | {_f(g['means']['ma'])} | {_f(g['means']['loss'])} |")
    lines += per_sequence_table(result)
    if s.get("eval"):
        lines += eval_section(s["eval"])
    lines += ["", "## Files", "", f"`{JSONL}` (per sequence), `{SUMMARY}` (these figures)"]
    lines += [f"- `{name}`: {text}" for name, text in PLOTS.items()]
    return "\n".join(lines) + "\n"


def per_sequence_table(result: AuditResult) -> list[str]:
    """The forget set, one line per sequence (with the baseline's figures when there is one)."""
    rows = result.set_rows("forget")
    base = "baseline" in rows[0]
    lines = ["", "## Forget set, per sequence", ""]
    if base:
        lines += [
            "| id | verdict | MA | log10 p | loss percentile in holdout |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            b = r["baseline"]
            lines.append(
                f"| {r['id']} | {b['verdict']} → {r['verdict']} | {_f(b.get('ma'))} → {_f(r.get('ma'))} "
                f"| {_f(b['log10_p'], 1)} → {_f(r['log10_p'], 1)} | {_f(b['loss_pct'], 0)} → {_f(r['loss_pct'], 0)} |"
            )
    else:
        lines += ["| id | verdict | MA | log10 p | samples for 50% | loss percentile in holdout |"]
        lines.append("|---|---|---|---|---|---|")
        for r in rows:
            lines.append(
                f"| {r['id']} | {r['verdict']} | {_f(r.get('ma'))} | {_f(r['log10_p'], 1)} | {_n(r['samples_50'])} "
                f"| {_f(r['loss_pct'], 0)} |"
            )
    return lines


def eval_section(results: dict) -> list[str]:
    lines = ["", "## Utility (lm-evaluation-harness)", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                lines.append(f"| {task} | {metric} | {_f(float(value), 4)} |")
    return lines


# -- plots -------------------------------------------------------------------------------------------


def write_plots(out: Path, result: AuditResult) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (("mia_histograms.png", plot_mia_histograms), ("log10p_vs_ma.png", plot_log10p_vs_ma)):
        fig = draw(plt, result)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths


def plot_mia_histograms(plt, result: AuditResult):
    fig, axes = plt.subplots(1, len(MIA_SCORES), figsize=(4 * len(MIA_SCORES), 3.2))
    for ax, score in zip(axes, MIA_SCORES):
        values = {name: np.asarray([r[score] for r in result.set_rows(name)]) for name in SETS}
        bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=20)
        for name in SETS:
            ax.hist(values[name], bins=bins, alpha=0.55, color=COLORS[name], label=name)
        ax.set_title(f"{score}: AUC {_f(result.summary['mia'][score]['auc'])}")
        ax.set_xlabel(f"{score} (lower = more member-like)")
    axes[0].set_ylabel("sequences")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_log10p_vs_ma(plt, result: AuditResult):
    st = result.summary["settings"]
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r["log10_p"] for r in result.rows if math.isfinite(r["log10_p"])]
    floor = (min(finite) if finite else 0.0) - 5.0  # where p = 0 is drawn
    for name in SETS:
        rows = result.set_rows(name)
        ma = np.asarray([r.get("ma", np.nan) for r in rows], dtype=float)
        lp = np.asarray([r["log10_p"] for r in rows], dtype=float)
        zero = np.isneginf(lp)
        ax.scatter(ma[~zero], lp[~zero], s=18, color=COLORS[name], label=name, alpha=0.8)
        if zero.any():
            ax.scatter(ma[zero], np.full(zero.sum(), floor), s=24, marker="v", color=COLORS[name], alpha=0.8)
    # p at which `attack_samples` samples succeed with probability `attack_confidence`.
    n, q = st["attack_samples"], st["attack_confidence"]
    threshold = math.log10(-math.expm1(math.log1p(-q) / n))
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"discoverable ({n} samples, {q:.0%})")
    if any(not math.isfinite(r["log10_p"]) for r in result.rows):
        ax.axhline(floor, color="grey", ls=":", lw=1, label="p = 0 (outside the kept set)")
    ax.set_xlabel("greedy memorization accuracy (MA)")
    ax.set_ylabel("log10 p (sampling extraction)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
