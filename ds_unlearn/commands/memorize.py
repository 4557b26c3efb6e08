"""``ds-unlearn memorize``: the memorisation lab (Speicher et al.). Fine-tune a model on random
strings and record how it memorises them: phases, local prefix, global context, sequential
exposure, and unlearning in reverse.

One process:
    ds-unlearn memorize --model smollm2 --alphabet_size 4 --string_length 32 --num_strings 4 \\
        --epochs 40 --seed 0 --experiment exposure local_prefix --output_dir runs/lab
From a config (flags override it):
    ds-unlearn memorize --config configs/dynamics/exposure.yaml --output_dir runs/lab
Many ranks:
    deepspeed --num_accelerators 2 launch/memorize.py \\
        --config configs/dynamics/exposure.yaml --deepspeed configs/ds/zero3.json --output_dir runs/lab

Outputs in output_dir: dynamics.json, PNG plots, TensorBoard logs (tensorboard/), and with
--save_model the trained model (model/) and its strings as a forget set (canaries.jsonl).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..core import distributed as D
from ..core.files import check_output, clear_outputs, write_json
from ..core.models import load_config, load_tokenizer, resolve_model_dir
from ..lab.config import LabConfig
from . import process
from .parsing import parse_config as parse_dataclass_config
from .parsing import print_help

PROG = "ds-unlearn memorize"
RESULTS = "dynamics.json"
# What a run writes; --overwrite removes only these, never anything else in output_dir.
LAB_OUTPUTS = (RESULTS, "canaries.jsonl", "model", "tensorboard", "unlearn")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print_help(LabConfig, PROG, __doc__)
        return 0
    config = parse_config(argv)
    if config.deepspeed:  # DeepSpeed on CPU: accelerate's gloo state, before any Trainer
        process.prepare_accelerate_for_deepspeed()
    return run(config)


def parse_config(argv: list[str]) -> LabConfig:
    """``[--config FILE.yaml] [--flag value ...]`` into a validated LabConfig (a YAML
    ``experiment: NAME`` is a list of one)."""
    return parse_dataclass_config(LabConfig, argv, prog=PROG, adjust_yaml=_one_experiment_is_a_list)


def _one_experiment_is_a_list(data: dict) -> dict:
    if isinstance(data.get("experiment"), str):
        data["experiment"] = [data["experiment"]]
    return data


def run(config: LabConfig) -> int:
    started = time.time()
    # Everything that can be wrong with the input is found here, before anything is written.
    model_dir = resolve_model_dir(config.model)
    out = Path(config.output_dir)
    check_output(out, option="output_dir", overwrite=config.overwrite, inputs=(model_dir,), directory=True)
    from ..lab.experiments import run_lab
    from ..lab.strings import build_strings

    tokenizer = load_tokenizer(model_dir)
    strings = build_strings(config, tokenizer, load_config(model_dir).vocab_size)
    D.barrier()  # every rank has checked output_dir before rank 0 creates it
    if D.is_main():
        from ..lab.plots import PLOT_FILES

        clear_outputs(out, (*LAB_OUTPUTS, *PLOT_FILES))
    D.barrier()

    results = run_lab(config, strings, model_dir, tokenizer, out)
    if D.is_main():
        from ..lab.plots import write_plots
        from ..lab.results import summarize

        entropy = strings.describe()["distribution"]["entropy_bits"]
        summary = summarize(results, entropy)
        plots = write_plots(results, out, summary["entropy_nats"], first_char=1 - strings.keep)
        write_json(
            out / RESULTS,
            {
                "config": asdict(config),
                "world_size": D.world_size(),
                "strings": strings.describe(),
                "summary": summary,
                **results,
                "plots": plots,
                "wall_seconds": round(time.time() - started, 2),
            },
        )
        print(summary_line(config, summary, out))
    return 0


def summary_line(config: LabConfig, summary: dict, out: Path) -> str:
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}
    return (
        f"memorize ({', '.join(config.experiment)}; l={config.alphabet_size}, n={config.string_length}, "
        f"{config.num_strings} strings): {shown} -> {out / RESULTS}"
    )
