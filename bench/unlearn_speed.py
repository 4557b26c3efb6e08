"""Unlearning speed on 2 DeepSpeed CPU ranks, side by side in one run, in three parts:

1. ``epoch_cost METHOD zeroN ratio=R`` per method and stage (bench/epoch_cost.py: the real
   trainer, real judging; R = epoch time / (optimizer step + one forward over the forget set)).
2. Seconds per epoch of GA, SGA (all / a quarter selected) and TAU, and peak memory per rank
   under ZeRO-0 and ZeRO-3 (below).
3. ``lora_vs_full METHOD memory_ratio=M time_ratio=T``: LoRA adapters against full fine-tuning
   for the same method under ZeRO-3 (bench/lora_speed.py).

    python bench/unlearn_speed.py                  # all three parts, at their default sizes
    python bench/unlearn_speed.py --only variants  # part 2 only (~100M-parameter Llama, ~12 min)
    python bench/unlearn_speed.py --only epoch_cost
    python bench/unlearn_speed.py --only lora       # part 3 only: lora_vs_full (bench/lora_speed.py)
    python bench/unlearn_speed.py --hidden 64 --layers 2 --vocab 512 --epochs 1 --only variants   # smoke run

The parent launches the real launcher once per ZeRO stage,
``deepspeed --num_accelerators 2 bench/unlearn_speed.py --worker --stage S --result FILE``,
with a DeepSpeed config derived from ``configs/ds/zero2.json`` (stage 0) or
``configs/ds/zero3.json`` (stage 3) whose "auto" values the Trainer fills.

Each worker builds one model from a config (under ZeRO-3 partitioned at construction, through
the Trainer's DeepSpeed config) and runs ONE ``UnlearnTrainer.train()`` whose epochs switch
between the variants: GA, SGA with gamma 0 (every row selected), SGA with a quarter of the rows
above gamma, and TAU (descent plus the per-epoch task-vector edit and restore of each rank's own
shards). It is the real trainer -- its state machine, ``sga_selection``, ``plan_epoch`` and
``UnlearnTrainer.end_epoch`` -- with only the forget-set scoring replaced by fixed per-sequence
scores: scoring costs the same for every method and would hide the differences. A variant
starts as a fresh run would (``begin_run`` with that method's settings, untimed).

Schedule: two GA epochs (warm-up; GA's memory is read after them, before any other variant),
one warm-up epoch of each other variant, then ``--epochs`` measured rounds GA, SGA-all,
SGA-quarter, TAU, interleaved so that load from other jobs on a shared machine falls on every
variant alike. An epoch is timed from ``on_epoch_begin`` to the end of ``on_epoch_end`` (so it
includes end_epoch's bookkeeping: the non-finite check, the last-good snapshot and, for TAU, the
edit/restore), between barriers, slowest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("GA", "SGA-all", "SGA-quarter", "TAU")
# UnlearnConfig fields per variant. SGA-all: gamma 0 keeps every score. SGA-quarter: the default
# gamma 0.7 keeps the rows scored 0.9 (every 4th, see fixed_scores). TAU: tv_switch_ma 1.0
# skips the ascent, so every epoch is a finetune epoch judged on the edited weights.
SETTINGS = {
    "GA": dict(method="ga", sga_gamma=0.7, tv_coefficient=None, tv_switch_ma=None),
    "SGA-all": dict(method="sga", sga_gamma=0.0, tv_coefficient=None, tv_switch_ma=None),
    "SGA-quarter": dict(method="sga", sga_gamma=0.7, tv_coefficient=None, tv_switch_ma=None),
    "TAU": dict(method="tau", sga_gamma=0.7, tv_coefficient=1.0, tv_switch_ma=1.0),
}


def fixed_scores(n: int) -> list[float]:
    """MA per forget row: every 4th memorized (0.9), the rest not (0.3); the per-sequence stop
    rule never holds, so no variant stops early."""
    return [0.9 if i % 4 == 0 else 0.3 for i in range(n)]


def intermediate_size(hidden: int) -> int:
    return max(64, round(8 * hidden / 3 / 64) * 64)  # Llama's ~8/3 ratio: 768 -> 2048


MODEL_ARGS = ("hidden", "layers", "vocab", "intermediate", "num_sequences", "length", "batch_size", "epochs", "seed")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 x hidden")
    parser.add_argument("--num_sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="per rank; 16 rows on 2 ranks = 1 step/epoch")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per variant (interleaved rounds)")
    parser.add_argument("--seed", type=int, default=0)


# -- worker (one DeepSpeed rank) ------------------------------------------------------------------
def rss_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def live_tensor_kib() -> int:
    """Bytes of every distinct tensor storage Python can reach (between steps that is all of
    them: weights, gradients, optimizer state, snapshots); RSS minus this is the process itself,
    freed memory the allocator kept, and nothing else."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) // 1024


GA_FIRST = 2  # GA epochs before any other variant (both warm-up): the first has no Adam state yet


def epoch_schedule(rounds: int) -> tuple[list[str], list[bool]]:
    """GA twice (warm-up; its memory is read after them), one warm-up epoch of each other
    variant, then ``rounds`` measured rounds that interleave the variants, so that load from
    other processes on a shared machine falls on all of them alike rather than on one block."""
    warm = ["GA"] * GA_FIRST + [v for v in VARIANTS if v != "GA"]
    schedule = warm + list(VARIANTS) * rounds
    return schedule, [False] * len(warm) + [True] * (len(schedule) - len(warm))


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
    from ds_unlearn.unlearn.trainer import RunState, UnlearnTrainer

    transformers.logging.set_verbosity_error()
    schedule, measured = epoch_schedule(args.epochs)
    # The DeepSpeed config goes in FIRST: under ZeRO-3 the model below is then built under
    # deepspeed.zero.Init (partitioned), and UnlearnConfig sets up accelerate for gloo.
    settings = dict(
        model="bench",
        forget="bench",
        output_dir=args.output_dir,
        deepspeed=args.ds_config,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=len(schedule),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
        **SETTINGS["GA"],
    )
    process.init_distributed()
    process.configure_process_for_trainer(settings)  # accelerate on CPU ranks, as the unlearn command does
    config = UnlearnConfig(**settings)
    baseline = rss_now_kib()

    torch.manual_seed(args.seed)
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
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    params = list(model.parameters())
    partitioned = all(hasattr(p, "ds_numel") for p in params)
    if args.stage == 3 and not partitioned:
        raise SystemExit("ZeRO-3: the model was not partitioned at construction (no ds_numel)")
    n_params = sum(p.ds_numel if partitioned else p.numel() for p in params)
    local_elems = sum(p.ds_tensor.numel() if partitioned else p.numel() for p in params)
    after_model = rss_now_kib()

    sequences = random_sequences(args.num_sequences, args.length, args.vocab, seed=args.seed + 1)
    forget = SequenceSet(ids=list(range(len(sequences))), sequences=sequences)
    scores = fixed_scores(len(sequences))

    class BenchTrainer(UnlearnTrainer):
        """The real UnlearnTrainer with the forget-set scoring replaced by fixed scores."""

        def score_set(self, data, el=True):
            return [{"ma": m, **({"el_10": m} if el else {}), "loss": 1.0 - m} for m in scores]

    class EpochClock(TrainerCallback):
        """Times each epoch (after UnlearnMonitor, so end_epoch is inside) and switches variants."""

        def __init__(self, trainer):
            self.trainer, self.epoch, self.start = trainer, 0, 0.0
            self.times = {v: [] for v in VARIANTS}
            self.bookkeeping = {v: [] for v in VARIANTS}  # last step_end -> epoch_end (end_epoch)
            self.log = []  # every epoch in order: (variant, seconds, bookkeeping seconds)
            self.last_step = 0.0
            self.rows = {v: 0 for v in VARIANTS}
            self.at_init = self.steady_after_ga = self.peak_after_ga = self.tensors_after_ga = 0

        def on_train_begin(self, args_, state, control, **kwargs):
            self.at_init = rss_now_kib()  # engine built, begin_run's last-good snapshot taken

        def on_epoch_begin(self, args_, state, control, **kwargs):
            self.rows[schedule[self.epoch]] = len(self.trainer.epoch_rows())
            D.barrier()
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.last_step = time.perf_counter()

        def on_epoch_end(self, args_, state, control, **kwargs):
            D.barrier()
            now = time.perf_counter()
            seconds, bookkeeping = now - self.start, now - self.last_step
            variant = schedule[self.epoch]
            self.log.append((variant, round(seconds, 3), round(bookkeeping, 3)))
            if measured[self.epoch]:
                self.times[variant].append(seconds)
                self.bookkeeping[variant].append(bookkeeping)
            self.epoch += 1
            if self.epoch == GA_FIRST:  # GA alone so far: its memory, before the other variants
                self.steady_after_ga, self.peak_after_ga = rss_now_kib(), rss_peak_kib()
                self.tensors_after_ga = live_tensor_kib()
            if self.epoch < len(schedule) and schedule[self.epoch] != variant:
                self.switch(schedule[self.epoch], control)

        def switch(self, variant, control):
            """A fresh run of the next method on the current weights (begin_run, untimed)."""
            trainer = self.trainer
            for key, value in SETTINGS[variant].items():
                setattr(trainer.args, key, value)
            trainer.run, trainer.base = RunState(), None
            trainer.begin_run(control)
            assert trainer.run.phase == ("finetune" if variant == "TAU" else "ascent"), trainer.run.phase

    trainer = BenchTrainer(model=model, args=config, forget=forget)
    trainer.remove_callback(PrinterCallback)
    clock = EpochClock(trainer)
    trainer.add_callback(clock)
    trainer.train()
    end = rss_peak_kib()

    mine = {
        "rank": D.rank(),
        "baseline_kib": baseline,
        "after_model_kib": after_model,
        "at_init_kib": clock.at_init,
        "steady_after_ga_kib": clock.steady_after_ga,
        "tensors_after_ga_kib": clock.tensors_after_ga,
        "peak_after_ga_kib": clock.peak_after_ga,
        "peak_end_kib": end,
        "local_param_elems": local_elems,
        "times": clock.times,
        "bookkeeping": clock.bookkeeping,
        "log": clock.log,
        "rows": clock.rows,
        "threads": torch.get_num_threads(),
    }
    ranks = D.all_gather_objects(mine)
    if D.is_main():
        Path(args.result).write_text(
            json.dumps(
                {
                    "stage": args.stage,
                    "world_size": D.world_size(),
                    "params": n_params,
                    "partitioned": partitioned,
                    "ranks": ranks,
                }
            )
        )


# -- parent -----------------------------------------------------------------------------------------
def write_ds_configs(folder: Path) -> dict[int, Path]:
    """Stage 0 from zero2.json (its stage-2-only keys dropped), stage 3 = zero3.json; "auto" kept."""
    zero2 = json.loads((REPO / "configs/ds/zero2.json").read_text())
    zero2["zero_optimization"] = {"stage": 0}
    zero3 = json.loads((REPO / "configs/ds/zero3.json").read_text())
    paths = {}
    for stage, cfg in ((0, zero2), (3, zero3)):
        paths[stage] = folder / f"zero{stage}.json"
        paths[stage].write_text(json.dumps(cfg, indent=2))
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, stage: int, ds_config: Path, folder: Path, ranks: int) -> dict:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    result = folder / f"result_stage{stage}.json"
    log = folder / f"stage{stage}.log"
    model_args = [f"--{k}={getattr(args, k)}" for k in MODEL_ARGS]
    cmd = [
        str(deepspeed if deepspeed.exists() else shutil.which("deepspeed")),
        "--num_accelerators",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--stage",
        str(stage),
        "--result",
        str(result),
        "--ds_config",
        str(ds_config),
        "--output_dir",
        str(folder / f"out{stage}"),
        *model_args,
    ]
    threads = max(1, (os.cpu_count() or ranks) // ranks)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    seconds = time.perf_counter() - start
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"ZeRO-{stage} worker failed (exit {code}); last lines of {log}:\n{tail}")
    print(f"ZeRO-{stage}: done in {seconds:.0f} s", flush=True)
    return {**json.loads(result.read_text()), "wall_s": seconds}


def slowest(res: dict, key: str, variant: str) -> list[float]:
    """Per measured epoch, the slowest rank's figure (ranks meet at a barrier around each epoch)."""
    return [max(values) for values in zip(*(r[key][variant] for r in res["ranks"]))]


def mib(kib: float) -> float:
    return kib / 1024  # ru_maxrss and /proc are in KiB


def time_table(results: dict[int, dict]) -> None:
    print(
        f"\n{'stage':<7}{'variant':<13}{'rows':>5}{'s/epoch':>9}{'min-max':>13}{'vs GA':>8}{'end_epoch s':>13}   target"
    )
    medians: dict[tuple[int, str], float] = {}
    for stage, res in results.items():
        for variant in VARIANTS:
            secs = slowest(res, "times", variant)
            medians[stage, variant] = med = statistics.median(secs)
            book = statistics.median(slowest(res, "bookkeeping", variant))
            target = {"SGA-all": "<= 1.10x GA", "SGA-quarter": "< SGA-all"}.get(variant, "")
            spread = f"{min(secs):.2f}-{max(secs):.2f}"
            print(
                f"ZeRO-{stage:<2}{variant:<13}{res['ranks'][0]['rows'][variant]:>5}{med:>9.2f}{spread:>13}"
                f"{med / medians[stage, 'GA']:>7.2f}x{book:>13.2f}   {target}"
            )
    if {0, 3} <= set(results):
        print(
            "ZeRO-3 / ZeRO-0 seconds per epoch: "
            + ", ".join(f"{v} {medians[3, v] / medians[0, v]:.2f}x" for v in VARIANTS)
        )


MEMORY_COLUMNS = (  # (heading, key, relative to the pre-model RSS?)
    ("model", "after_model_kib", True),
    ("init", "at_init_kib", True),
    ("GA steady", "steady_after_ga_kib", True),
    ("GA tensors", "tensors_after_ga_kib", False),
    ("GA peak", "peak_after_ga_kib", True),
    ("end peak", "peak_end_kib", True),
)
MEMORY_RATIOS = (  # (label, key, minus the pre-model RSS?)
    ("peak RSS after GA", "peak_after_ga_kib", False),
    ("its growth", "peak_after_ga_kib", True),
    ("live tensors after GA", "tensors_after_ga_kib", False),
    ("peak RSS at end", "peak_end_kib", False),
    ("its growth", "peak_end_kib", True),
)


def memory_table(results: dict[int, dict]) -> None:
    print(
        "\nmemory per rank, MiB: RSS before the model is built ('pre-model'); growth over it after the model "
        "is built, after engine init, between steps after GA ('steady'); tensors alive then; peak RSS "
        "(ru_maxrss) growth after GA and at the end; the end peak itself"
    )
    print(
        f"{'stage':<7}{'rank':>5}{'local params':>14}{'pre-model':>11}"
        + "".join(f"{name:>12}" for name, *_ in MEMORY_COLUMNS)
        + f"{'peak RSS':>10}"
    )
    for stage, res in results.items():
        for r in res["ranks"]:
            b = r["baseline_kib"]
            print(
                f"ZeRO-{stage:<2}{r['rank']:>5}{r['local_param_elems']:>14,}{mib(b):>11.0f}"
                + "".join(
                    f"{mib(r[key] - b):>+12.0f}" if rel else f"{mib(r[key]):>12.0f}" for _, key, rel in MEMORY_COLUMNS
                )
                + f"{mib(r['peak_end_kib']):>10.0f}"
            )
    if {0, 3} <= set(results):

        def largest(stage, key, growth):
            return max(r[key] - (r["baseline_kib"] if growth else 0) for r in results[stage]["ranks"])

        print(
            "ZeRO-3 / ZeRO-0, largest rank: "
            + ", ".join(f"{label} {largest(3, key, g) / largest(0, key, g):.2f}x" for label, key, g in MEMORY_RATIOS)
            + "   (target: peak <= 0.60x)"
        )


def report(args, results: dict[int, dict], wall: float, load: tuple) -> None:
    first = next(iter(results.values()))
    print(
        f"\nmodel: Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocab {args.vocab}, untied embeddings, fp32: {first['params']:,} parameters"
    )
    print(
        f"forget set: {args.num_sequences} sequences x {args.length} tokens; per-rank batch {args.batch_size} on "
        f"{first['world_size']} ranks; {args.epochs} measured epochs per variant, interleaved, after warm-up; "
        f"torch threads per rank {first['ranks'][0]['threads']}"
    )
    time_table(results)
    memory_table(results)
    per_stage = ", ".join(f"ZeRO-{s} {r['wall_s']:.0f} s" for s, r in results.items())
    print(
        f"\nWall time {wall:.0f} s ({per_stage}, each with launcher start-up and model build). "
        f"Load average before/after: {load[0]:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
    )
    print(
        textwrap.fill(
            "Notes: s/epoch = median over the measured epochs of the slowest rank. It covers the training epoch and "
            "UnlearnTrainer.end_epoch's bookkeeping ('end_epoch s': non-finite check, last-good snapshot, and for "
            "TAU the task-vector edit and restore of each rank's own shards) but NOT the per-epoch forget-set "
            "scoring, which costs the same for every method and is replaced here by fixed scores. 'rows' = forget "
            "rows trained per epoch, chosen by sga_selection and dealt by plan_epoch; the number of micro-batches "
            "and optimizer steps per epoch is fixed by the forget-set size, so SGA saves compute inside each "
            "micro-batch only. GA = after GA's epochs, before the other variants; the end peak adds TAU's "
            "theta_base and edit snapshots. "
            f"Machine: {os.cpu_count()} CPU cores shared with other jobs, no GPU; DeepSpeed runs on CPU over gloo, "
            "where ZeRO-3's parameter gathers and gradient reduce-scatters (with its partitioning hooks) are all of "
            f"its extra time over ZeRO-0 for the same compute{zero3_share(results)}; they do not overlap with "
            "compute there as they do on GPUs with NCCL.",
            width=110,
        )
    )


def zero3_share(results: dict[int, dict]) -> str:
    if not {0, 3} <= set(results):
        return ""
    t0, t3 = (statistics.median(slowest(results[s], "times", "GA")) for s in (0, 3))
    return f": {1 - t0 / t3:.0%} of a ZeRO-3 GA epoch here" if t3 > t0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3], choices=[0, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep configs, rank logs and results in this folder")
    parser.add_argument("--only", choices=["epoch_cost", "variants", "lora"], default=None, help="run one part only")
    # Worker-only (set by the parent / the launcher).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--ds_config", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.intermediate = args.intermediate or intermediate_size(args.hidden)
    if args.worker:
        from ds_unlearn.commands import process

        try:
            worker(args)
        finally:
            process.finalize()  # ZeRO-3 ranks abort at exit without a clean process-group exit
        return

    if args.only in (None, "epoch_cost"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import epoch_cost

        cost_parser = argparse.ArgumentParser()
        epoch_cost.add_args(cost_parser)
        epoch_cost.run_all(cost_parser.parse_args([f"--ranks={args.ranks}"]))
        if args.only == "epoch_cost":
            return
    if args.only in (None, "lora"):  # LoRA vs full, same method, ZeRO-3 (bench/lora_speed.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import lora_speed

        lora_parser = argparse.ArgumentParser()
        lora_speed.add_args(lora_parser)
        lora_speed.run_all(lora_parser.parse_args([]))
        if args.only == "lora":
            return
    load = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unlearn_speed_") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        configs = write_ds_configs(folder)
        results = {stage: launch(args, stage, configs[stage], folder, args.ranks) for stage in args.stages}
    report(args, results, time.perf_counter() - start, load)


if __name__ == "__main__":
    main()
