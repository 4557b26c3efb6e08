"""LoRA vs full fine-tuning for the same unlearning method: per-rank peak memory and epoch time
under ZeRO-3 on 2 DeepSpeed CPU ranks, a ~100M-parameter Llama built from a config.

    python bench/lora_speed.py                         # SGA, ~100M parameters (a few minutes)
    python bench/lora_speed.py --methods sga tau       # one line per method
    python bench/unlearn_speed.py --only lora          # the same, from the unlearning bench
    python bench/lora_speed.py --hidden 64 --layers 2 --vocab 512   # smoke run

Prints, per method, ``lora_vs_full METHOD memory_ratio=M time_ratio=T`` where M = the largest
rank's peak RSS growth over its RSS before the model was built (the weights, gradients,
optimizer state, gathers and activations the run adds; the Python/torch runtime itself is the
same for both and left out) with LoRA / without, and T = median seconds per epoch with LoRA /
without. Raw peak RSS figures follow on their own line.

Each run is the real launcher and the real ``UnlearnTrainer`` (ZeRO-3 from configs/ds/zero3.json,
model partitioned at construction, adapters added by ``unlearn.lora.prepare_model`` exactly as
``run_unlearning`` does), with the forget-set scoring replaced by fixed per-sequence scores, as in
bench/unlearn_speed.py (scoring costs the same forward passes either way and would hide the
training-state difference). One warm-up epoch, then ``--epochs`` measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from unlearn_speed import fixed_scores, free_port, intermediate_size, rss_now_kib, rss_peak_kib  # noqa: E402

METHOD_SETTINGS = {
    "ga": {},
    "sga": {},
    "tau": dict(tv_switch_ma=1.0),  # every epoch a finetune epoch, judged on the edited adapters
    "ta": dict(tv_switch_ma=1.0),
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
    from ds_unlearn.unlearn.lora import prepare_model
    from ds_unlearn.unlearn.trainer import UnlearnTrainer

    transformers.logging.set_verbosity_error()
    settings = dict(
        model="bench",
        forget="bench",
        output_dir=args.output_dir,
        deepspeed=args.ds_config,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs + 1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        method=args.method,
        lora_r=args.lora_r,
        **METHOD_SETTINGS[args.method],
    )
    process.init_distributed()
    process.configure_process_for_trainer(settings)
    config = UnlearnConfig(**settings)
    baseline = rss_now_kib()
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=intermediate_size(args.hidden),
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=args.length + 8,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if args.lora_r:
        model = prepare_model(model, config)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    sequences = random_sequences(args.num_sequences, args.length, args.vocab, seed=1)
    scores = fixed_scores(len(sequences))

    class BenchTrainer(UnlearnTrainer):
        def score_set(self, data, el=True):
            return [{"ma": m, **({"el_10": m} if el else {}), "loss": 1.0 - m} for m in scores]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_epoch_begin(self, *a, **k):
            D.barrier()
            self.start = time.perf_counter()

        def on_epoch_end(self, *a, **k):
            D.barrier()
            self.times.append(time.perf_counter() - self.start)

    forget = SequenceSet(ids=list(range(len(sequences))), sequences=sequences)
    trainer = BenchTrainer(model=model, args=config, forget=forget)
    trainer.remove_callback(PrinterCallback)
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    mine = {"baseline_kib": baseline, "peak_kib": rss_peak_kib(), "times": clock.times}
    ranks = D.all_gather_objects(mine)
    if D.is_main():
        result = {"params": n_params, "trainable": trainable, "ranks": ranks}
        Path(args.result).write_text(json.dumps(result))


def launch(args, method: str, lora_r: int, folder: Path) -> dict:
    result = folder / f"{method}_r{lora_r}.json"
    log = folder / f"{method}_r{lora_r}.log"
    model_args = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "num_sequences", "length")]
    cmd = [
        str(Path(sys.executable).with_name("deepspeed")),
        "--num_accelerators",
        "2",
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        f"--method={method}",
        f"--lora_r={lora_r}",
        f"--result={result}",
        f"--ds_config={REPO / 'configs/ds/zero3.json'}",
        f"--output_dir={folder / f'out_{method}_{lora_r}'}",
        f"--epochs={args.epochs}",
        f"--batch_size={args.batch_size}",
        *model_args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{method} lora_r={lora_r} failed (exit {code}); last lines of {log}:\n{tail}")
    return json.loads(result.read_text())


def compare(method: str, full: dict, lora: dict) -> None:
    growth = lambda res: max(r["peak_kib"] - r["baseline_kib"] for r in res["ranks"])
    peak = lambda res: max(r["peak_kib"] for r in res["ranks"])
    # Slowest rank per epoch (ranks meet at a barrier), first epoch (warm-up) left out.
    epoch = lambda res: statistics.median(max(t) for t in zip(*(r["times"][1:] for r in res["ranks"])))
    print(
        f"lora_vs_full {method.upper()} memory_ratio={growth(lora) / growth(full):.2f} "
        f"time_ratio={epoch(lora) / epoch(full):.2f}"
    )
    print(
        f"  {method}: {full['params']:,} parameters; trainable full {full['trainable']:,}, LoRA "
        f"{lora['trainable']:,}; peak RSS growth per rank full {growth(full) / 1024:.0f} MiB, LoRA "
        f"{growth(lora) / 1024:.0f} MiB; peak RSS full {peak(full) / 1024:.0f} MiB, LoRA {peak(lora) / 1024:.0f} MiB "
        f"(ratio {peak(lora) / peak(full):.2f}); s/epoch full {epoch(full):.2f}, LoRA {epoch(lora):.2f}",
        flush=True,
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=["sga"], choices=sorted(METHOD_SETTINGS))
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--num_sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4, help="per rank: 8 rows on 2 ranks = 1 step/epoch")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up)")


def run_all(args) -> None:
    with tempfile.TemporaryDirectory(prefix="lora_speed_") as tmp:
        for method in args.methods:
            full = launch(args, method, 0, Path(tmp))
            lora = launch(args, method, args.lora_r, Path(tmp))
            compare(method, full, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    for hidden in ("--worker", "--method", "--result", "--ds_config", "--output_dir", "--local_rank"):
        kwargs = {"action": "store_true"} if hidden == "--worker" else {"default": None}
        parser.add_argument(hidden, help=argparse.SUPPRESS, **kwargs)
    args = parser.parse_args()
    if not args.worker:
        run_all(args)
        return
    from ds_unlearn.commands import process

    args.lora_r = int(args.lora_r)
    try:
        worker(args)
    finally:
        process.finalize()


if __name__ == "__main__":
    main()
