"""The GPU check anyone with one GPU runs in under 8 minutes: every GPU-only path once.

    python3 bench/gpu_check.py                 # on a GPU node (see ../shared/gpu/README.md)
    python3 bench/gpu_check.py --tiny          # the same path on CPU with a tiny model (a smoke run)

1. Builds a GPT-Neo-125M-shaped model from a config (never downloaded) and makes it memorize 32
   random 200-token sequences (AdamW lr 1e-3, bf16 autocast, full batch) until every one is
   reproduced; saves it with a forget set (those 32) and a holdout (32 never-seen sequences).
2. Scores the forget set on one process and under ZeRO-3 (``deepspeed --num_gpus 1``) and prints
   the largest difference per metric.
3. Runs GA, SGA with ``--score_refresh step`` and TAU under ZeRO-2 and ZeRO-3 with bf16, and
   prints for each: mean epoch time, mean optimizer step time, their ratio, peak GPU memory, and
   memorized counts before/after (from each run's report.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: unlearn flags
    "GA": ["--method", "ga"],
    "SGA-step": ["--method", "sga", "--score_refresh", "step"],
    "TAU": ["--method", "tau"],
}


def build(folder: Path, tiny: bool, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    from ds_unlearn.core.files import write_jsonl
    from ds_unlearn.core.toy import random_sequences, tiny_config

    torch.manual_seed(0)
    if tiny:
        config, length, vocab = tiny_config("gpt_neo", vocab_size=512, max_positions=256), 48, 512
    else:
        config = GPTNeoConfig(
            vocab_size=50257,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            max_position_embeddings=2048,
            attention_types=[[["global", "local"], 6]],
            window_size=256,
        )
        length, vocab = 200, 50257
    model = AutoModelForCausalLM.from_config(config).to(device)
    forget = random_sequences(32, length, vocab, seed=1)
    holdout = random_sequences(32, length, vocab, seed=2)
    ids = torch.tensor(forget, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if not tiny else 1e-2)
    start = time.time()
    for step in range(400):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            with torch.no_grad():
                acc = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
            if acc > 0.999:
                break
    print(f"memorized 32 x {length} tokens in {step + 1} steps, {time.time() - start:.0f} s (MA {acc:.4f})")
    model.save_pretrained(folder / "model")
    for name, rows in (("forget", forget), ("holdout", holdout)):
        write_jsonl(folder / f"{name}.jsonl", [{"id": f"{name}-{i}", "input_ids": s} for i, s in enumerate(rows)])


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        print(f"FAILED (exit {code}): {' '.join(cmd)}\n" + "\n".join(log.read_text().splitlines()[-25:]))
        raise SystemExit(1)
    return time.time() - start


def deepspeed_cmd(script: str, device: str) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    ranks = ["--num_gpus", "1"] if device == "cuda" else ["--num_accelerators", "1"]
    return [launcher, *ranks, "--master_port", str(_free_port()), str(REPO / script)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, not a GPU")
    parser.add_argument("--keep", default=None, help="keep the model, data, logs and reports in this folder")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = ["--dtype", "bfloat16"] if device == "cuda" else []
    bf16 = ["--bf16", "true"] if device == "cuda" else []
    lr = "5e-5" if not args.tiny else "3e-3"  # the paper's rate; the tiny model needs a larger one
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        build(folder, args.tiny, device)
        model, forget, holdout = folder / "model", folder / "forget.jsonl", folder / "holdout.jsonl"

        # (a) scoring: one process vs ZeRO-3
        common = ["--model", str(model), "--data", str(forget), "--extract_k", "32", *dtype, "--batch_size", "64"]
        one = folder / "score_one.jsonl"
        t_one = run([sys.executable, "-m", "ds_unlearn.cli", "score", *common, "--out", str(one)], folder / "s1.log")
        z3 = folder / "score_z3.jsonl"
        z3_args = [*common, "--out", str(z3), "--deepspeed", str(REPO / "configs/ds/zero3.json")]
        t_z3 = run([*deepspeed_cmd("launch/score.py", device), *z3_args], folder / "s3.log")
        a = [json.loads(line) for line in one.read_text().splitlines()]
        b = [json.loads(line) for line in z3.read_text().splitlines()]
        diffs = {k: max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b)) for k in ("loss", "ma", "el_10")}
        print(f"score: 1 process {t_one:.0f} s, ZeRO-3 {t_z3:.0f} s; max difference " + json.dumps(diffs))

        # (b) unlearning under ZeRO-2 / ZeRO-3, bf16
        print(f"{'run':<18}{'epochs':>7}{'epoch s':>9}{'step s':>8}{'ratio':>7}{'peak GiB':>10}  memorized")
        for stage in (2, 3):
            for name, flags in RUNS.items():
                out = folder / f"{name}_zero{stage}"
                cmd = [
                    *deepspeed_cmd("launch/unlearn.py", device),
                    *["--model", str(model), "--forget", str(forget), "--holdout", str(holdout)],
                    *flags,
                    *["--output_dir", str(out), "--per_device_train_batch_size", "32", "--learning_rate", lr],
                    *["--num_train_epochs", "20", "--report_to", "none", "--score_batch_size", "64"],
                    *["--deepspeed", str(REPO / f"configs/ds/zero{stage}.json"), *bf16],
                ]
                run(cmd, folder / f"{name}_zero{stage}.log")
                report = json.loads((out / "report.json").read_text())
                hist = [h for h in report["history"] if "time/epoch_s" in h]
                epoch = sum(h["time/epoch_s"] for h in hist) / max(len(hist), 1)
                step = sum(h["time/step_s"] for h in hist) / max(len(hist), 1)
                peak = report.get("peak_device_memory_gib")
                print(
                    f"{name + f' zero{stage}':<18}{report['epochs']:>7}{epoch:>9.2f}{step:>8.3f}"
                    f"{epoch / step if step else float('nan'):>7.1f}{peak if peak is not None else 'n/a':>10}  "
                    f"{report['before']['memorized']} -> {report['after']['memorized']} of {report['before']['count']}"
                )
    print(f"gpu_check done in {time.time() - started:.0f} s on {device}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
