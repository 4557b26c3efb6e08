"""The seeds a run accepts: the one check every config (unlearn, lab, audit, demo) applies."""

from __future__ import annotations

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit (transformers.set_seed seeds both)


def seed_problem(seed: int) -> str | None:
    """Why ``seed`` cannot seed the run (numpy refuses it, deep inside the run), or None."""
    return None if 0 <= seed <= SEED_MAX else f"must lie in [0, {SEED_MAX}], got {seed}"
