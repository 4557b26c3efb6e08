"""The indistinguishability goal of the demo, checked item by item from a ``report.json``.

The goal (issue "Unlearning that a membership attack cannot tell from retraining"), measured by
``ds-unlearn demo`` against its own retrained model: 0 memorized and 0 over-unlearned (each
model's records judged among its own never-planted records), every attack's AUC within 0.05 of
the retrained model's, forget quality p >= 0.05, TPR at 1% FPR no higher than the retrained
model's interval allows, holdout perplexity within +3% of the planted model's, retain MA within
0.02, no record discoverable, and the whole demo within 600 s by its own clock. The attacks are
the four the goal names (``report.ATTACKS``: loss, zlib, min_k++, ref; Min-K% is reported
elsewhere but is not a goal item), TPR is the loss attack's. Beside the fixed
AUC tolerance, ``goal_checks`` reports the paired reading (``core.mia.auc_difference``): whether
each attack's interval of AUC - AUC_retrained holds 0, which is what sets this small can resolve.
``bench/demo_goal.py`` prints the checks of one or more demo folders.
"""

from __future__ import annotations

from dataclasses import dataclass

from .report import ATTACKS, RETRAINED_ROW, against_retrained

AUC_TOLERANCE = 0.05
MIN_FORGET_QUALITY = 0.05
MAX_PPL_CHANGE_PCT = 3.0
MAX_RETAIN_MA_DROP = 0.02
MAX_DEMO_SECONDS = 600.0


@dataclass(frozen=True)
class Check:
    """One goal item: ``value`` as printed, the ``goal`` in words, ``met`` (None: cannot be
    measured from this report, e.g. TPR at 1% FPR with fewer than 100 non-members)."""

    item: str
    value: str
    goal: str
    met: bool | None


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def goal_checks(report: dict, method: str) -> list[Check]:
    """The goal's items for ``method`` (a key of ``report["methods"]``) of one demo ``report``
    (``DIR/report.json``), in the issue's order, then the demo's clock. Raises KeyError when the
    method did not run, ValueError when the report has no retrained audit."""
    table = against_retrained(report["methods"], report["planting"])
    if not table:
        raise ValueError(f"{report['demo']['output_dir']}: no retrained audit in its report")
    m, f, truth = report["methods"][method], table[method], table[RETRAINED_ROW]
    checks = [
        Check("memorized", str(f["memorized"]), "0", f["memorized"] == 0),
        Check("over-unlearned", str(f["over_unlearned"]), "0", f["over_unlearned"] == 0),
    ]
    differences = m["audit"]["after"].get("auc_difference", {})
    paired = bool(differences) and all(d.get("ci95") is not None for d in differences.values())
    for attack in ATTACKS:
        auc, auc_r = f["auc"][attack], truth["auc"][attack]
        gap = None if auc is None or auc_r is None else auc - auc_r
        checks.append(
            Check(
                f"{attack} AUC - retrained",
                f"{_fmt(auc)} - {_fmt(auc_r)} = {_fmt(gap, 3)}",
                f"abs <= {AUC_TOLERANCE}",
                None if gap is None else abs(gap) <= AUC_TOLERANCE,
            )
        )
        d = differences.get(attack)
        if paired and d is not None:
            lo, hi = d["ci95"]
            checks.append(
                Check(
                    f"{attack} paired 95% interval",
                    f"[{lo:+.3f}, {hi:+.3f}]",
                    "holds 0",
                    bool(d["indistinguishable"]),
                )
            )
    if not paired:  # a report from before auc_difference, or an audit without bootstrap
        checks.append(Check("paired 95% intervals", "n/a", "each holds 0", None))
    quality = f["forget_quality"]
    checks.append(
        Check("forget quality", _fmt(quality), f">= {MIN_FORGET_QUALITY}", None if quality is None else quality >= 0.05)
    )
    tpr = f["tpr"]
    bound = (
        report["planting"]["audit"]["retrained"]["summary"]
        .get("tpr_at_fpr", {})
        .get("loss", {})
        .get("0.01", {})
        .get("ci95")
    )
    checks.append(
        Check(
            "TPR @ 1% FPR (loss)",
            _fmt(tpr),
            "<= the upper end of the retrained model's 95% interval "
            + ("(n/a)" if bound is None else f"{bound[1]:.3f}"),
            None if tpr is None or bound is None else tpr <= bound[1],
        )
    )
    ppl = f["ppl_change"]
    checks.append(
        Check("holdout ppl change", f"{ppl:+.1f}%", f"<= +{MAX_PPL_CHANGE_PCT:g}%", ppl <= MAX_PPL_CHANGE_PCT)
    )
    retain = m["retain_ma"]
    drop = retain["before"] - retain["after"]
    checks.append(
        Check(
            "retain MA",
            f"{retain['before']:.3f} -> {retain['after']:.3f}",
            f"drop <= {MAX_RETAIN_MA_DROP}",
            drop <= MAX_RETAIN_MA_DROP,
        )
    )
    discoverable = m["audit"]["after"]["discoverable"]
    checks.append(Check("discoverable", str(discoverable), "0", discoverable == 0))
    total = report.get("timing", {}).get("total")
    checks.append(
        Check(
            "demo seconds (timing.total)",
            _fmt(total, 0),
            f"<= {MAX_DEMO_SECONDS:g}",
            None if total is None else total <= MAX_DEMO_SECONDS,
        )
    )
    return checks


def goal_lines(report: dict, method: str) -> list[str]:
    """Markdown: ``goal_checks`` as a table, then how many items are met of those measurable."""
    checks = goal_checks(report, method)
    mark = {True: "yes", False: "NO", None: "n/a"}
    lines = [
        f"{report['demo']['output_dir']} (seed {report['demo']['settings']['seed']}), {method}:",
        "",
        "| item | value | goal | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.item} | {c.value} | {c.goal} | {mark[c.met]} |" for c in checks]
    measured = [c for c in checks if c.met is not None]
    lines += ["", f"{sum(c.met for c in measured)} of {len(measured)} measurable items met."]
    return lines
