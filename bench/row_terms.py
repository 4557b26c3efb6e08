"""What computing a step's per-row loss terms on their own rows saves (``losses.on_rows``), side by
side in one run against the same terms computed over every row of the step, as the trainer did
before: the demo's match step on SmolLM2-135M (the bundled checkpoint), one micro-batch of
``--ascended`` forget rows (capped ascent with the z floor) and ``--kl`` rows (KL toward the input
model: match's non-members and the retain rows), ``--length`` tokens each, forward and backward.

    python bench/row_terms.py                              # the demo's match step: 32 + 56 rows x 32
    python bench/row_terms.py --ascended 4 --kl 4 --repeats 1   # smoke run

Prints one line:

    row_terms full=F s rows=R s ratio=F/R

F and R are the mean wall seconds of a whole step (forward, every loss term, backward) after one
warm-up step; the model's own forward and backward are the same in both, so the ratio is the
whole step's, not the loss terms' alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from ds_unlearn.core import smollm2
from ds_unlearn.core.models import load_causal_lm
from ds_unlearn.unlearn.losses import (
    on_rows,
    per_sequence_capped_nll,
    per_sequence_kl,
    per_sequence_nll,
    per_sequence_z_shortfall,
)

CAP, Z_FLOOR = 5.0, -4.5  # nats and z: the order of the demo's token cap and z floor


def step(model, ids, reference, n_ascended: int, restricted: bool) -> None:
    """One forward and backward of the mixed step; ``restricted``: every term on its own rows."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    size = ids.shape[0]
    nll, _ = per_sequence_nll(logits, ids)
    ascended = torch.arange(size) < n_ascended

    def capped(x, y):
        return per_sequence_capped_nll(x, y, CAP) - per_sequence_z_shortfall(x, y, Z_FLOOR)

    if restricted:
        rows_a, rows_k = ascended.nonzero()[:, 0], (~ascended).nonzero()[:, 0]
        cap = on_rows(capped, rows_a, size, logits, ids)
        kl = on_rows(lambda x, y: per_sequence_kl(x, reference[n_ascended:], y), rows_k, size, logits, ids)
    else:  # what the trainer did before: the capped NLL and KL over every row (the reference
        # zero-padded at the ascended rows), the z floor already on the ascended rows only
        rows_a = ascended.nonzero()[:, 0]
        cap = per_sequence_capped_nll(logits, ids, CAP)
        shortfall = per_sequence_z_shortfall(logits.index_select(0, rows_a), ids.index_select(0, rows_a), Z_FLOOR)
        cap = cap.index_add(0, rows_a, -shortfall)
        padded = torch.zeros(size, *reference.shape[1:])
        padded[n_ascended:] = reference[n_ascended:]
        kl = per_sequence_kl(logits, padded, ids)
    loss = torch.where(ascended, -cap, kl) + 0 * nll
    loss.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ascended", type=int, default=32)
    parser.add_argument("--kl", type=int, default=56)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_causal_lm(smollm2.cached_smollm2_dir())
    size = args.ascended + args.kl
    ids = torch.randint(0, model.config.vocab_size, (size, args.length))
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    seconds = {}
    for restricted in (False, True, False, True):  # interleaved: both see the same machine load
        step(model, ids, reference, args.ascended, restricted)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            step(model, ids, reference, args.ascended, restricted)
        seconds.setdefault(restricted, []).append((time.perf_counter() - start) / args.repeats)
    full, rows = (sum(seconds[r]) / len(seconds[r]) for r in (False, True))
    print(f"row_terms full={full:.2f} s rows={rows:.2f} s ratio={full / rows:.2f}", flush=True)


if __name__ == "__main__":
    main()
