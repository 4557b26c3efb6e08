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

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .. import distributed as D
from ..errors import InputError
from ..files import write_json
from ..lab_config import LabConfig, build_parser, parse_config
from ..models import load_config, load_tokenizer, resolve_model_dir

RESULTS = "dynamics.json"
# What a run writes; --overwrite removes only these, never anything else in output_dir.
LAB_OUTPUTS = (RESULTS, "canaries.jsonl", "model", "tensorboard", "unlearn")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        build_parser().print_help()
        return 0
    D.init_distributed()
    try:
        return run(parse_config(argv))
    finally:
        D.finalize()


def check_output_dir(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Never inside (or holding) the input checkpoint; never over an earlier run unless asked."""
    o, src = out.resolve(), model_dir.resolve()
    if o == src or src in o.parents:
        raise InputError(f"output_dir: {out} lies inside the input checkpoint {model_dir}")
    if o in src.parents:
        raise InputError(f"output_dir: {out} holds the input checkpoint {model_dir}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir: {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output_dir: {out} is not empty (pass --overwrite to replace a lab run's outputs)")


def prepare_output_dir(out: Path) -> None:
    from ..lab_plots import PLOT_FILES

    out.mkdir(parents=True, exist_ok=True)
    for name in (*LAB_OUTPUTS, *PLOT_FILES):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run(config: LabConfig) -> int:
    started = time.time()
    # Everything that can be wrong with the input is found here, before anything is written.
    model_dir = resolve_model_dir(config.model)
    out = Path(config.output_dir)
    check_output_dir(out, model_dir, config.overwrite)
    from ..lab import build_strings, run_lab

    tokenizer = load_tokenizer(model_dir)
    strings = build_strings(config, tokenizer, load_config(model_dir).vocab_size)
    D.barrier()  # every rank has checked output_dir before rank 0 creates it
    if D.is_main():
        prepare_output_dir(out)
    D.barrier()

    results = run_lab(config, strings, model_dir, tokenizer, out)
    if D.is_main():
        from ..lab_plots import write_plots
        from ..lab_results import summarize

        entropy = strings.describe()["distribution"]["entropy_bits"]
        summary = summarize(results, entropy)
        plots = write_plots(results, out, summary["entropy_nats"], first_char=1 - strings.keep)
        write_json(out / RESULTS, {
            "config": asdict(config), "world_size": D.world_size(), "strings": strings.describe(),
            "summary": summary, **results, "plots": plots, "wall_seconds": round(time.time() - started, 2),
        })
        print(summary_line(config, summary, out))
    return 0


def summary_line(config: LabConfig, summary: dict, out: Path) -> str:
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}
    return (f"memorize ({', '.join(config.experiment)}; l={config.alphabet_size}, n={config.string_length}, "
            f"{config.num_strings} strings): {shown} -> {out / RESULTS}")
