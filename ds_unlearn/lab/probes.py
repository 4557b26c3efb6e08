"""Measuring a model on the lab's strings: teacher-forced rows, the per-epoch record, and the
local-prefix and global-context probes.

Every function here is collective: the sequences are sharded over ranks in equal contiguous
shards and the rows gathered on all of them, so every rank runs the same number of forward
passes and ZeRO-3's parameter gathers never hang. Every rank must call with the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core import distributed as D
from ..core.passes import teacher_forced_rows
from .dynamics import different_distribution, local_windows, replaced_contexts, sample_strings, smallest_k
from .strings import LabStrings

MEASURE_BATCH = 64  # sequences per forward pass when measuring (strings are short)


def teacher_forced(model, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(match row, NLL row) of every sequence: contiguous equal shards per rank (the last padded
    with repeats), so every rank runs the same number of forward passes; gathered on all ranks."""
    mine = [sequences[i] for i in D.shard_indices(len(sequences))]
    was_training = model.training
    model.eval()
    try:
        rows = []
        for i in range(0, len(mine), MEASURE_BATCH):
            rows.extend(teacher_forced_rows(model, mine[i : i + MEASURE_BATCH]))
    finally:
        model.train(was_training)
    return D.gather_shards(rows, len(sequences))


def last_predictions(model, probes: Sequence[Sequence[int]]) -> list[bool]:
    """Whether each probe's last token is the model's top-1 prediction from the tokens before."""
    order = sorted(range(len(probes)), key=lambda i: len(probes[i]))  # similar lengths batch together
    rows = teacher_forced(model, [probes[i] for i in order])
    out = [False] * len(probes)
    for i, (match, _) in zip(order, rows):
        out[i] = bool(match[-1])
    return out


def measure(model, strings: LabStrings) -> dict:
    """Per-string accuracy, loss and correctness row, and the control strings' mean accuracy/loss."""
    rows = teacher_forced(model, strings.train_sequences + strings.control_sequences)
    train, control = rows[: len(strings.train)], rows[len(strings.train) :]
    return {
        "accuracy": [float(m.mean()) for m, _ in train],
        "loss": [float(n.mean()) for _, n in train],
        "control_accuracy": float(np.mean([m.mean() for m, _ in control])),
        "control_loss": float(np.mean([n.mean() for _, n in control])),
        # Per control string: what the one verdict (core.verdict) places the strings among.
        "control_accuracies": [float(m.mean()) for m, _ in control],
        "positions": [m.astype(int).tolist() for m, _ in train],
    }


def local_prefix(model, strings: LabStrings, ks: Sequence[int]) -> dict:
    """Accuracy when each prediction sees only the last k characters of its context."""
    sequences = strings.train_sequences
    full = [m for m, _ in teacher_forced(model, sequences)]
    probes = [
        (i, k, j, p) for k in ks for i, s in enumerate(sequences) for j, p in local_windows(s, k, strings.keep).items()
    ]
    answers = last_predictions(model, [p for *_, p in probes])
    rows = {k: [m.copy() for m in full] for k in ks}  # positions with short contexts keep their answer
    for (i, k, j, _), correct in zip(probes, answers):
        rows[k][i][j] = correct
    accuracy = [float(np.mean([r.mean() for r in rows[k]])) for k in ks]
    full_accuracy = float(np.mean([m.mean() for m in full]))
    return {
        "ks": list(ks),
        "accuracy": accuracy,
        "full_accuracy": full_accuracy,
        "k_90": smallest_k(ks, accuracy, full_accuracy),
    }


def global_context(model, strings: LabStrings, ks: Sequence[int], seed: int) -> dict:
    """Accuracy at the positions whose context is longer than k, when the context before the
    last k characters is kept, dropped (local only), or replaced by fresh characters from the
    same distribution or from a different one."""
    rng = np.random.default_rng([seed, 1])
    sequences = strings.train_sequences
    length = len(strings.train[0])
    full = [m for m, _ in teacher_forced(model, sequences)]
    sources = {
        "same_distribution": strings.probabilities,
        "different_distribution": different_distribution(strings.probabilities),
    }
    fresh = {
        name: [strings.sequence(s)[strings.keep :] for s in sample_strings(p, length, len(sequences), rng)]
        for name, p in sources.items()
    }
    probes = []  # (k, variant, string, position, probe)
    for k in ks:
        for i, seq in enumerate(sequences):
            probes += [(k, "local_only", i, j, p) for j, p in local_windows(seq, k, strings.keep).items()]
            for name in sources:
                replaced = replaced_contexts(seq, k, strings.keep, fresh[name][i])
                probes += [(k, name, i, j, p) for j, p in replaced.items()]
    answers = last_predictions(model, [p[-1] for p in probes])
    hits: dict[tuple[int, str], list[bool]] = {}
    positions: dict[int, list[tuple[int, int]]] = {}
    for (k, name, i, j, _), correct in zip(probes, answers):
        hits.setdefault((k, name), []).append(correct)
        if name == "local_only":
            positions.setdefault(k, []).append((i, j))
    results = [
        {
            "k": k,
            "positions": len(positions[k]),
            "full": float(np.mean([full[i][j] for i, j in positions[k]])),
            **{name: float(np.mean(hits[k, name])) for name in ("local_only", *sources)},
        }
        for k in ks
    ]
    return {"different_distribution": sources["different_distribution"].tolist(), "by_k": results}
