"""Fast scorer vs the papers' per-prefix procedure, side by side on the same model and sequences.

    python bench/score_speed.py            # about 3 minutes on 2 CPU cores
    python bench/score_speed.py --device cuda --hidden 768 --layers 12

Builds a small Llama from a config, trains it to memorize one set of random sequences per length,
then scores that memorized set and an unseen set of the same length with both methods. Prints
seconds, sequences per second, the speed-up and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import time

import torch

from ds_unlearn import score_sequences
from ds_unlearn.core.toy import memorize, random_sequences, tiny_model


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def largest_difference(a: list[dict], b: list[dict]) -> float:
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 200])
    parser.add_argument("--num_sequences", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    header = f"{'set':<10}{'T':>5}{'method':>11}{'seconds':>10}{'seq/s':>9}{'speed-up':>10}{'max |diff|':>12}"
    rows = []
    for length in args.lengths:
        model = tiny_model(
            "llama",
            seed=args.seed,
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            layers=args.layers,
            max_positions=max(args.lengths) + 8,
        )
        memorized = random_sequences(args.num_sequences, length, args.vocab, seed=args.seed + length)
        unseen = random_sequences(args.num_sequences, length, args.vocab, seed=args.seed + length + 1)
        (_, train_s) = timed(lambda: memorize(model, memorized, steps=150, lr=1e-2))
        model = model.to(args.device).eval()
        print(f"T={length}: memorized {args.num_sequences} sequences in {train_s:.0f} s", flush=True)
        for name, seqs in (("memorized", memorized), ("unseen", unseen)):
            kwargs = dict(el_n=(10,), extract_k=(32,), batch_size=args.batch_size)
            fast, fast_s = timed(lambda: score_sequences(model, seqs, method="fast", **kwargs))
            ref, ref_s = timed(lambda: score_sequences(model, seqs, method="reference", **kwargs))
            diff = largest_difference(fast, ref)
            mean_ma = sum(r["ma"] for r in fast) / len(fast)
            n = len(seqs)
            rows.append(f"{name:<10}{length:>5}{'reference':>11}{ref_s:>10.2f}{n / ref_s:>9.1f}{'1.0x':>10}{'':>12}")
            rows.append(
                f"{'':<10}{'':>5}{'fast':>11}{fast_s:>10.2f}{n / fast_s:>9.1f}"
                f"{ref_s / fast_s:>9.1f}x{diff:>12.1e}   (mean ma {mean_ma:.2f})"
            )
            print(rows[-2] + "\n" + rows[-1], flush=True)
    print(
        f"\nmodel: llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"{args.num_sequences} sequences per set, batch {args.batch_size}, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
