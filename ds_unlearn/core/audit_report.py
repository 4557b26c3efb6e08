"""An audit's files: ``audit.jsonl`` (per sequence, by id), ``audit.json`` (summary),
``audit.md`` (a short report a person can read) and three plots (matplotlib, Agg backend).

No text is ever written: rows carry ids and numbers only. JSON follows Python's ``json``
convention for non-finite floats: ``log10_p`` of a suffix the decoding settings can never
sample is ``-Infinity`` (p = 0) and the samples it needs ``Infinity``; ``json.loads`` and pandas
read them back as floats.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .audit import SETS, VERDICTS, AuditResult
from .files import write_json, write_jsonl
from .mia import TPR_FPRS

JSONL, SUMMARY, MARKDOWN = "audit.jsonl", "audit.json", "audit.md"
PLOTS = {
    "mia_histograms.png": "Forget vs holdout histograms of each membership score",
    "log10p_vs_ma.png": "Per sequence: log10 p of sampling extraction against greedy MA",
    "roc.png": "ROC curve of every membership attack on log-log axes (Carlini et al. 2022: the low-FPR corner)",
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


def _reading(entry: dict) -> str:
    """The two-sided reading of an AUC interval, in words."""
    if entry.get("distinguishable") is None:
        return "n/a (no bootstrap)"
    if not entry["distinguishable"]:
        return "indistinguishable (interval covers 0.5)"
    if entry["direction"] == "members lower":
        return "distinguishable: members lower (still look trained on)"
    return "distinguishable: members higher (pushed past never-seen text)"


def _fpr_name(fpr: float) -> str:
    return f"{fpr * 100:g}%"


def _tpr(entry: dict) -> str:
    if entry["tpr"] is None:
        return "cannot be estimated"
    ci = entry.get("ci95")
    return _f(entry["tpr"]) + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "")


def _side(t: dict, level: str, sign: str) -> str:
    """One side of the verdict on MA, as its equivalent level (``Thresholds.summary``)."""
    scores = [s for s in t["band_on"] if s != "ma"]
    on_ma = f"MA {sign} {_f(t[level])}" if t[level] is not None else "never on MA"
    return on_ma if not scores else f"{on_ma} or {'/'.join(scores)} outside the holdout's band"


def _rule(t: dict) -> str:
    if t["rule"] == "levels":
        return "fixed MA levels"
    return (
        f"by mid-rank position among {t['holdout_rows']} holdout rows, ties counting half, outside their "
        f"central {100 * (1 - 2 * t['quantile']):g}%"
    )


def markdown(result: AuditResult) -> str:
    s, st = result.summary, result.summary["settings"]
    t = s["thresholds"]
    suffix = "the rest of each sequence" if st["suffix_length"] is None else f"the next {st['suffix_length']} tokens"
    decoding = f"temperature {st['temperature']}, top-k {st['top_k'] or 'off'}, top-p {st['top_p'] or 'off'}"
    lines = [
        "# ds-unlearn audit",
        "",
        f"Model: `{s.get('model', 'n/a')}`. {s['forget']['count']} forget and {s['holdout']['count']} holdout "
        f"sequences (named by id only). Verdicts: memorized if {_side(t, 'memorized_ma', '≥')}, discoverable if "
        f"{st['attack_samples']} samples reproduce the suffix with probability ≥ {st['attack_confidence']}, "
        f"over-unlearned if {_side(t, 'over_unlearned_ma', '≤')}, else unseen-like ({_rule(t)}).",
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
        "1.0 = every forget sequence looks trained on, 0.0 = every one pushed past text the model never saw "
        "(it leaks as much). Reading: distinguishable when the interval excludes 0.5, and which way."
        + (" `ref` = loss minus the reference model's loss." if "ref" in s["mia"] else ""),
        "",
        "| score | AUC [95% CI] | reading | forget mean | holdout mean |"
        + (" AUC before |" if "baseline" in s else ""),
        "|---|---|---|---|---|" + ("---|" if "baseline" in s else ""),
    ]
    for score in s["mia"]:
        row = (
            f"| {score} | {_auc(s['mia'][score])} | {_reading(s['mia'][score])} "
            f"| {_n(s['forget']['mia_means'][score])} | {_n(s['holdout']['mia_means'][score])} |"
        )
        if "baseline" in s:
            before = s["baseline"]["mia"].get(score)
            row += f" {_auc(before) if before else 'n/a'} |"
        lines.append(row)
    lines += tpr_section(s)
    if "privleak" in s:
        lines += retrained_section(s)
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


def tpr_section(s: dict) -> list[str]:
    """TPR at low FPR per attack (Carlini et al. 2022), saying where the holdout is too small."""
    fprs = [float(f) for f in next(iter(s["tpr_at_fpr"].values()))]
    lines = [
        "",
        "### TPR at low FPR (Carlini et al. 2022)",
        "",
        "Share of forget sequences an attacker flags while flagging at most that share of the holdout; "
        "95% bootstrap interval in brackets.",
        "",
        "| score | " + " | ".join(f"TPR at {_fpr_name(f)} FPR" for f in fprs) + " |",
        "|---|" + "---|" * len(fprs),
    ]
    for score, entries in s["tpr_at_fpr"].items():
        lines.append(f"| {score} | " + " | ".join(_tpr(entries[str(f)]) for f in fprs) + " |")
    first = next(iter(s["tpr_at_fpr"].values()))
    missing = [f for f in fprs if first[str(f)]["tpr"] is None]
    if missing:
        lines += [
            "",
            f"Cannot be estimated at {', '.join(_fpr_name(f) for f in missing)} FPR: "
            f"the holdout has {s['holdout']['count']} sequences, and an FPR of x needs at least 1/x "
            f"({', '.join(str(math.ceil(1 / f - 1e-9)) for f in missing)}).",
        ]
    return lines


def retrained_section(s: dict) -> list[str]:
    """The audit against a model retrained without the forget set (MUSE's PrivLeak, TOFU's forget quality)."""
    ks = s["forget_quality_ks"]
    differences = s.get("auc_difference", {})
    intervals = bool(differences) and all(d["ci95"] is not None for d in differences.values())
    lines = [
        "",
        "### Against the retrained model (trained without the forget set)",
        "",
        "PrivLeak (MUSE) = (AUC - AUC retrained) / AUC retrained x 100: near 0 = where the retrained model "
        "sits, positive = still member-like, negative = pushed past it.",
        "",
    ]
    if intervals:
        lines += [
            "The difference's interval is a paired bootstrap (the same records drawn for both models): where it "
            "holds 0, the attack's AUC under this model is within noise of its AUC under the retrained model.",
            "",
        ]
    ci = " [95% CI]" if intervals else ""
    lines += [
        f"| score | AUC | AUC retrained{ci} | AUC - retrained{' [paired 95% CI]' if intervals else ''} | PrivLeak % |",
        "|---|---|---|---|---|",
    ]
    for score, value in s["privleak"].items():
        d = differences.get(score)
        delta = "n/a" if d is None else _auc({"auc": d["delta"], "ci95": d["ci95"]})
        lines.append(
            f"| {score} | {_f(s['mia'][score]['auc'])} | {_auc(s['mia_retrained'][score])} | {delta} | {_f(value, 1)} |"
        )
    verdict = "cannot be told apart" if s["forget_quality"] >= 0.05 else "differ"
    lines += [
        "",
        f"Forget quality (TOFU): KS-test p-value {s['forget_quality']:.3g} (statistic {_f(ks['statistic'])}) "
        f"between the {ks['forget_count']} forget sequences' losses under this model and under the retrained "
        f"model: the two {verdict} at the 5% level.",
    ]
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
    draws = (
        ("mia_histograms.png", plot_mia_histograms),
        ("log10p_vs_ma.png", plot_log10p_vs_ma),
        ("roc.png", plot_roc),
    )
    for name, draw in draws:
        fig = draw(plt, result)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths


def plot_mia_histograms(plt, result: AuditResult):
    scores = list(result.summary["mia"])
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2))
    for ax, score in zip(axes, scores):
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


def plot_roc(plt, result: AuditResult):
    """Every attack's ROC curve (forget = positives, flagged when the score is low) on log-log
    axes, where the low-FPR corner Carlini et al. 2022 read is visible; a rate of 0 is drawn at
    half of one sequence's share of its set, and the FPRs of ``tpr_at_fpr`` as dotted lines."""
    from sklearn.metrics import roc_curve

    forget, holdout = result.set_rows("forget"), result.set_rows("holdout")
    x_floor, y_floor = 0.5 / len(holdout), 0.5 / len(forget)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for score, entry in result.summary["mia"].items():
        values = np.asarray([r[score] for r in forget + holdout], dtype=float)
        labels = np.r_[np.ones(len(forget)), np.zeros(len(holdout))]
        fpr, tpr, _ = roc_curve(labels, -values)
        ax.step(
            np.maximum(fpr, x_floor), np.maximum(tpr, y_floor), where="post", label=f"{score} (AUC {_f(entry['auc'])})"
        )
    ax.plot([x_floor, 1], [x_floor, 1], color="grey", ls="--", lw=1, label="chance")
    for fpr in TPR_FPRS:
        ax.axvline(fpr, color="black", ls=":", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(x_floor, min(TPR_FPRS)) * 0.8, 1.05)
    ax.set_ylim(min(x_floor, y_floor) * 0.8, 1.05)
    ax.set_xlabel(f"false positive rate (holdout, {len(holdout)} sequences)")
    ax.set_ylabel(f"true positive rate (forget, {len(forget)} sequences)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
