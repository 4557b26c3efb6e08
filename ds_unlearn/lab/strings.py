"""The lab's strings as tokens: the alphabet mapped onto token ids, the training strings and the
unseen control strings (drawn before any weights load)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from .config import LabConfig
from .dynamics import (
    chance_level,
    character_distribution,
    entropy_bits,
    map_symbols,
    sample_strings,
    shared_contexts,
    string_entropy_bits,
)


@dataclass
class LabStrings:
    """The alphabet as tokens, the training strings and the unseen control strings."""

    symbols: list[str]
    token_ids: list[int]
    leading_space: bool
    bos_id: int | None
    probabilities: np.ndarray
    train: list[list[int]]  # symbol indices
    control: list[list[int]]

    @property
    def keep(self) -> int:
        """Leading tokens that are not part of the string (BOS), kept by every probe."""
        return 0 if self.bos_id is None else 1

    def sequence(self, string: Sequence[int]) -> list[int]:
        return [self.bos_id] * self.keep + [self.token_ids[c] for c in string]

    @property
    def train_sequences(self) -> list[list[int]]:
        return [self.sequence(s) for s in self.train]

    @property
    def control_sequences(self) -> list[list[int]]:
        return [self.sequence(s) for s in self.control]

    @property
    def predicted(self) -> int:
        """Predicted tokens per string: every character, except the first one without BOS."""
        return len(self.train[0]) - 1 + self.keep

    def text(self, string: Sequence[int]) -> str:
        return "".join(self.symbols[c] for c in string)

    def describe(self) -> dict:
        def rows(strings, prefix):
            return [
                {
                    "id": f"{prefix}-{i:03d}",
                    "text": self.text(s),
                    "entropy_bits": string_entropy_bits(s),
                    "chance_level": chance_level(s),
                }
                for i, s in enumerate(strings)
            ]

        train = rows(self.train, "canary")
        for row, shared in zip(train, shared_contexts(self.train, self.keep)):
            row["shared_context_positions"] = int(sum(shared))  # out of reach for any model
        return {
            "symbols": self.symbols,
            "token_ids": self.token_ids,
            "leading_space": self.leading_space,
            "bos_token_id": self.bos_id,
            "distribution": {
                "probabilities": self.probabilities.tolist(),
                "entropy_bits": entropy_bits(self.probabilities),
                "chance_level": float(self.probabilities.max()),
            },
            "train": train,
            "control": rows(self.control, "control"),
        }


def build_strings(config: LabConfig, tokenizer, vocab_size: int) -> LabStrings:
    """Map the alphabet onto tokens and draw the strings; fails, naming the cause, before any
    weights load."""
    if tokenizer is None:
        raise InputError("model: the checkpoint ships no tokenizer; the lab needs one to map characters to tokens")
    token_ids, leading_space = map_symbols(tokenizer, config.symbols)
    if max(token_ids) >= vocab_size:
        raise InputError(f"symbols: token id {max(token_ids)} is outside the model's vocabulary [0, {vocab_size})")
    bos_id = None
    if config.bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise InputError("bos: the tokenizer has no BOS token")
    probabilities = character_distribution(config.alphabet_size, config.distribution, config.target_entropy)
    rng = np.random.default_rng(config.seed)
    train = sample_strings(probabilities, config.string_length, config.num_strings, rng)
    control = sample_strings(probabilities, config.string_length, config.control_strings, rng)
    return LabStrings(config.symbols, token_ids, leading_space, bos_id, probabilities, train, control)
