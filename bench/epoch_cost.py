"""What an unlearning epoch costs next to what it must cost: the real ``UnlearnTrainer`` (real
per-sequence judging, snapshots, task-vector edits) on 2 DeepSpeed CPU ranks, per method and
ZeRO stage, side by side in one run.

    python bench/epoch_cost.py                    # ~20M-parameter Llama, 32 x 200 tokens
    python bench/epoch_cost.py --hidden 64 --layers 2 --vocab 512 --length 64 --epochs 2   # smoke run

Prints one line per method and stage:

    epoch_cost METHOD zeroN ratio=R

R = mean epoch wall time / (mean optimizer step time + one teacher-forced forward pass over the
forget set), slowest rank, after one warm-up epoch. An epoch here is the paper's setting: the
whole forget set in one optimizer step, then judging (one forward over the forget set and one over
a holdout of the same size, MA per sequence), the non-finite check, the last-good snapshot and, for
TAU, the task-vector edit and restore. EL_10 before the first and after the last epoch is not part
of an epoch and is skipped here (on never-trained random text it would dominate the run).
Goal: R <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # UnlearnConfig settings per method; SGA selects every row (gamma 0), as GA trains
    "ga": dict(method="ga"),
    "sga": dict(method="sga", sga_gamma=0.0),
    "tau": dict(method="tau", tv_switch_ma=1.0),  # task vector from the first epoch: edit every epoch
}


def worker(args) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from ds_unlearn.commands import process
    from ds_unlearn.core import distributed as D
    from ds_unlearn.core.data import SequenceSet
    from ds_unlearn.core.toy import random_sequences
    from ds_unlearn.unlearn.config import UnlearnConfig
    from ds_unlearn.unlearn.trainer import UnlearnTrainer

    transformers.logging.set_verbosity_error()
    settings = dict(
        model="bench",
        forget="bench",
        holdout="bench-holdout",  # placeholders: the sets are passed in memory below
        output_dir=args.output_dir,
        deepspeed=args.ds_config,
        per_device_train_batch_size=args.num_sequences // args.ranks,  # one optimizer step per epoch
        num_train_epochs=args.epochs + 1,
        stop_rule="mean",
        mean_threshold=-1.0,  # never holds: every run does all its epochs
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        score_batch_size=args.num_sequences,
        seed=0,
        **METHODS[args.method],
    )
    process.init_distributed()
    process.configure_process_for_trainer(settings)
    config = UnlearnConfig(**settings)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=args.length + 8,
            tie_word_embeddings=False,
        )
    )
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    sets = [random_sequences(args.num_sequences, args.length, args.vocab, seed=s) for s in (1, 2)]
    forget, holdout = (SequenceSet(list(range(len(s))), s) for s in sets)

    class Trainer(UnlearnTrainer):
        def score_set(self, data, el=True):  # EL_10 before/after is not part of an epoch
            return super().score_set(data, el=False)

    class Clock(TrainerCallback):
        def __init__(self):
            self.epochs, self.steps = [], []

        def on_epoch_begin(self, a, state, control, **kw):
            D.barrier()
            self.epoch_start = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.steps.append(time.perf_counter() - self.step_start)

        def on_epoch_end(self, a, state, control, **kw):  # after UnlearnMonitor's end_epoch
            D.barrier()
            self.epochs.append(time.perf_counter() - self.epoch_start)

    trainer = Trainer(model=model, args=config, forget=forget, holdout=holdout)
    trainer.remove_callback(PrinterCallback)
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    assert trainer.run.epochs == args.epochs + 1, trainer.run.stop_reason
    forwards = []
    for _ in range(3):
        D.barrier()
        start = time.perf_counter()
        trainer.score_set(forget, el=False)
        D.barrier()
        forwards.append(time.perf_counter() - start)
    mine = {"epochs": clock.epochs[1:], "steps": clock.steps[1:], "forward": statistics.median(forwards)}
    ranks = D.all_gather_objects(mine)
    if D.is_main():
        Path(args.result).write_text(json.dumps({"params": params, "ranks": ranks}))
    process.finalize()


def ds_config(stage: int, folder: Path) -> Path:
    """Stage 0 from zero2.json (its stage-2 keys dropped), stage 3 = zero3.json; "auto" kept."""
    name = "zero2.json" if stage == 0 else "zero3.json"
    cfg = json.loads((REPO / "configs" / "ds" / name).read_text())
    if stage == 0:
        cfg["zero_optimization"] = {"stage": 0}
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def launch(args, method: str, stage: int, folder: Path) -> dict:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    result = folder / f"{method}_zero{stage}.json"
    cmd = [
        str(deepspeed if deepspeed.exists() else shutil.which("deepspeed")),
        "--num_accelerators",
        str(args.ranks),
        "--master_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        f"--method={method}",
        f"--result={result}",
        f"--ds_config={ds_config(stage, folder)}",
        f"--output_dir={folder / f'out_{method}_{stage}'}",
        *(f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "intermediate", "num_sequences")),
        *(f"--{k}={getattr(args, k)}" for k in ("length", "epochs", "ranks")),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks)),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log = folder / f"{method}_zero{stage}.log"
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{method} ZeRO-{stage} failed (exit {code}):\n{tail}")
    return json.loads(result.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ratio(res: dict) -> tuple[float, float, float, float]:
    """(R, epoch s, step s, forward s), each the slowest rank's mean."""
    epoch = max(statistics.mean(r["epochs"]) for r in res["ranks"])
    step = max(statistics.mean(r["steps"]) for r in res["ranks"])
    forward = max(r["forward"] for r in res["ranks"])
    return epoch / (step + forward), epoch, step, forward


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--num_sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up)")
    parser.add_argument("--ranks", type=int, default=2)


def run_all(args) -> dict:
    """Every method under ZeRO-0 and ZeRO-3; prints the epoch_cost lines; returns the ratios."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="epoch_cost_") as tmp:
        for stage in (0, 3):
            for method in METHODS:
                res = launch(args, method, stage, Path(tmp))
                r, epoch, step, forward = ratio(res)
                out[method, stage] = r
                print(
                    f"epoch_cost {method.upper()} zero{stage} ratio={r:.2f}   "
                    f"(epoch {epoch:.2f} s, step {step:.2f} s, forward {forward:.2f} s, {res['params']:,} params)",
                    flush=True,
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--ds_config", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
