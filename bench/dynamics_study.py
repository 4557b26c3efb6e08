"""The memorisation lab on the real SmolLM2-135M-Instruct: how alphabet size changes memorisation.

    python bench/dynamics_study.py                 # about 10 minutes on 2 shared CPU cores
    python bench/dynamics_study.py --alphabets 4 --exposure_epochs 10   # a quick look

For each alphabet size l (2, 4, 26) at one string length, two ``ds-unlearn memorize`` runs:
exposure of 4 strings (then the local-prefix probe), and sequential exposure A, B, A again.
Prints one row per l: epochs to the start of memorisation and to 0.99 accuracy (medians over
strings, '-' where the median string did not get there), and to accuracy 1 on the positions
whose context no other string shares (short strings over a small alphabet share openings that no
model can tell apart); the local-prefix k reaching 90% of full-context accuracy; and how much of
A is forgotten while B is learned, and how fast it comes back. Every run's dynamics.json and plots stay in --output_dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from ds_unlearn.cli import main as cli


def run(args, l: int, experiment: str, out: Path, *extra: str) -> dict:
    code = cli(
        [
            "memorize",
            "--model",
            args.model,
            "--alphabet_size",
            str(l),
            "--string_length",
            str(args.length),
            "--seed",
            str(args.seed),
            "--learning_rate",
            str(args.learning_rate),
            "--experiment",
            experiment,
            "--output_dir",
            str(out),
            *extra,
        ]
    )
    if code != 0:
        raise SystemExit(f"ds-unlearn memorize failed for l={l} ({experiment}), exit code {code}")
    gc.collect()  # the finished Trainer, its optimizer and the model: before the next load
    return json.loads((out / "dynamics.json").read_text())


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def row(l: int, exposure: dict, sequential: dict) -> dict:
    s, q = exposure["summary"], sequential["sequential"]
    return {
        "l": l,
        "entropy_bits": s["entropy_bits"],
        "memorisation_start": s["memorisation_start"],
        "full_at": s["full_at"],
        "unique_full_at": s["unique_full_at"],
        "final_accuracy": s["final_accuracy"],
        "final_control": s["final_control_accuracy"],
        "local_prefix_k90": s["local_prefix_k90"],
        "a_after_own_stage": q["forgetting"]["a_after_own_stage"],
        "a_after_b": q["forgetting"]["a_after_each_later_stage"][-1],
        "a_forgotten": q["forgetting"]["a_forgotten"],
        "a_first_epochs_to_full": q["relearning"]["first_exposure_epochs_to_full"],
        "a_relearn_epochs_to_full": q["relearning"]["relearn_epochs_to_full"],
    }


def table(rows: list[dict], args) -> str:
    head = (
        f"{'l':>3} {'H bits':>6} {'mem starts':>10} {'acc 0.99':>8} {'unique':>6} {'final acc':>9} {'control':>7} "
        f"{'k 90%':>5} | {'A own':>5} {'A after B':>9} {'forgotten':>9} {'A to 0.99':>9} {'again':>5}"
    )
    lines = [
        f"{args.model}: strings of {args.length} characters, lr {args.learning_rate:g}; exposure: "
        f"{args.num_strings} strings x {args.exposure_epochs} epochs; sequential: A, B, A again, "
        f"{args.stage_epochs} epochs each",
        "epochs are medians over strings ('-': the median string did not get there); unique: every "
        "position whose context no other string shares is right",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['l']:>3} {r['entropy_bits']:>6.2f} {fmt(r['memorisation_start'], 1):>10} {fmt(r['full_at'], 1):>8} "
            f"{fmt(r['unique_full_at'], 1):>6} "
            f"{r['final_accuracy']:>9.3f} {r['final_control']:>7.3f} {fmt(r['local_prefix_k90']):>5} | "
            f"{r['a_after_own_stage']:>5.2f} {r['a_after_b']:>9.2f} {r['a_forgotten']:>9.2f} "
            f"{fmt(r['a_first_epochs_to_full']):>9} {fmt(r['a_relearn_epochs_to_full']):>5}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--alphabets", type=int, nargs="+", default=[2, 4, 26])
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--num_strings", type=int, default=4)
    parser.add_argument("--exposure_epochs", type=int, default=24)
    parser.add_argument("--stage_epochs", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine a second one mostly waits (and slows the others).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default=None, help="default: a new temporary directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="dynamics_study_"))

    started = time.perf_counter()
    rows = []
    for l in args.alphabets:
        exposure = run(
            args,
            l,
            "local_prefix",
            root / f"l{l}_exposure",
            "--num_strings",
            str(args.num_strings),
            "--epochs",
            str(args.exposure_epochs),
        )
        sequential = run(
            args, l, "sequential", root / f"l{l}_sequential", "--num_strings", "2", "--epochs", str(args.stage_epochs)
        )
        rows.append(row(l, exposure, sequential))
    seconds = time.perf_counter() - started
    (root / "study.json").write_text(json.dumps({"rows": rows, "wall_seconds": seconds, **vars(args)}, indent=2))
    print()
    print(table(rows, args))
    print(f"\nwall time {seconds / 60:.1f} min; runs and plots in {root}")


if __name__ == "__main__":
    main()
