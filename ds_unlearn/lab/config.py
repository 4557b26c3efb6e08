"""``LabConfig``: every setting of a memorisation-lab run (``ds-unlearn memorize``).

YAML files (``configs/dynamics/``) map onto it key by key, unknown keys are an error, and
command-line flags override YAML, as for ``UnlearnConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.errors import InputError, param
from ..core.seeds import seed_problem
from .dynamics import LETTERS

EXPERIMENTS = ("exposure", "local_prefix", "global_context", "sequential", "unlearning")
# Experiments that probe or unlearn the model that the exposure run trained.
AFTER_EXPOSURE = ("local_prefix", "global_context", "unlearning")
UNLEARN_METHODS = ("ga", "sga")
# Settings only these experiments read (others ignore them, so a changed value is refused).
EXPERIMENT_SETTINGS = {
    "local_prefix_ks": ("local_prefix", "global_context"),
    "unlearn_method": ("unlearning",),
    "unlearn_epochs": ("unlearning",),
    "unlearn_learning_rate": ("unlearning",),
}
MIN_UNLEARN_TOKENS = 11  # the unlearning trainer scores EL_10 every epoch


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LabConfig:
    # The model and the strings.
    model: str | None = _help(
        "Hugging Face checkpoint directory, Hub model id, or 'smollm2'. Never written to.", default=None
    )
    alphabet_size: int | None = _help(
        "l: the strings use the first l lowercase letters (default 4, or len(symbols)).", default=None
    )
    symbols: list[str] | None = _help(
        "The alphabet as a list of characters, instead of the first l letters.", default=None
    )
    string_length: int = _help("Characters per string.", default=32)
    num_strings: int = _help(
        "Strings trained on (sequential: A, B, C, ... one after another). Short strings over a small alphabet "
        "share openings no model can tell apart; dynamics.json counts them (shared_context_positions).",
        default=4,
    )
    distribution: str = _help(
        "'uniform' or 'skewed' (p_i proportional to exp(-beta*i), beta set by target_entropy).", default="uniform"
    )
    target_entropy: float | None = _help(
        "Skewed only: entropy of the character distribution, in bits, in (0, log2 l].", default=None
    )
    bos: bool = _help("Put the tokenizer's BOS token in front of every string.", default=False)
    control_strings: int = _help(
        "Fresh unseen strings of the same distribution, measured every epoch as the control (a forward pass "
        "each: more of them make the control level less noisy).",
        default=8,
    )
    seed: int = _help("Seed of the strings, the probes and the Trainer.", default=0)

    # Training.
    epochs: int = _help("Epochs of exposure (sequential: per string, and again for relearning A).", default=40)
    learning_rate: float = _help(
        "Adam learning rate, constant. The paper uses about 1e-5 over about 100 epochs on GPUs; 1e-4 lets "
        "SmolLM2-135M-Instruct memorise short strings in tens of epochs on a CPU.",
        default=1e-4,
    )
    per_device_train_batch_size: int = _help(
        "Strings per micro-batch; at least num_strings gives one optimizer step per epoch.", default=16
    )
    deepspeed: str | None = _help(
        "DeepSpeed JSON config for multi-rank runs (deepspeed launch/memorize.py ... --deepspeed FILE).",
        default=None,
    )

    # What to run.
    experiment: list[str] = _help(
        f"One or more of {', '.join(EXPERIMENTS)}. local_prefix, global_context and unlearning probe the model "
        "the exposure run trained (they share one exposure); sequential trains its own schedule.",
        default_factory=lambda: ["exposure"],
    )
    phase_margin: float = _help(
        "Memorisation means accuracy clearly above the unseen control: above it by at least this much, and by "
        "two binomial standard errors of the control level over the string's positions.",
        default=0.1,
    )
    local_prefix_ks: list[int] | None = _help(
        "Context lengths k of the local-prefix and global-context probes (default 1..16, then every 4th up to 32, "
        "then 64, 128, ..., and the longest context minus one).",
        default=None,
    )
    unlearn_method: str = _help(
        "Unlearning experiment: 'ga' or 'sga' (the methods whose trained weights are the judged ones).", default="ga"
    )
    unlearn_epochs: int = _help(
        "Unlearning experiment: at most this many epochs; it stops once the mean accuracy is below the control's.",
        default=20,
    )
    unlearn_learning_rate: float | None = _help(
        "Unlearning experiment: learning rate (default: learning_rate).", default=None
    )

    # Outputs.
    output_dir: str | None = _help("Where dynamics.json, the plots, TensorBoard logs and the model go.", default=None)
    overwrite: bool = _help("Replace the lab outputs of an earlier run in output_dir.", default=False)
    save_model: bool = _help(
        "Save the trained model to output_dir/model and the strings to canaries.jsonl (a forget set).", default=False
    )

    def __post_init__(self):
        def bad(name, why):
            raise InputError(f"{name}: {why}")

        if not self.model:
            bad("model", "required (a checkpoint directory or 'smollm2')")
        if seed_problem(self.seed):
            bad("seed", seed_problem(self.seed))
        if not self.output_dir:
            bad("output_dir", "required")
        if isinstance(self.symbols, str):  # YAML `symbols: xyz` means the characters x, y, z
            self.symbols = list(self.symbols)
        if self.symbols is not None:
            if len(set(self.symbols)) != len(self.symbols) or not all(isinstance(s, str) and s for s in self.symbols):
                bad("symbols", "must be distinct non-empty characters")
            if self.alphabet_size is not None and self.alphabet_size != len(self.symbols):
                bad("alphabet_size", f"{self.alphabet_size} disagrees with the {len(self.symbols)} symbols given")
            self.alphabet_size = len(self.symbols)
        else:
            self.alphabet_size = 4 if self.alphabet_size is None else self.alphabet_size
            if not 2 <= self.alphabet_size <= len(LETTERS):
                bad("alphabet_size", f"must lie in [2, 26] (or give symbols), got {self.alphabet_size}")
            self.symbols = list(LETTERS[: self.alphabet_size])
        if self.alphabet_size < 2:
            bad("symbols", "need at least 2 characters")
        for name in (
            "string_length",
            "num_strings",
            "control_strings",
            "epochs",
            "per_device_train_batch_size",
            "unlearn_epochs",
        ):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.string_length < 2:
            bad("string_length", "must be at least 2 (the first character is never predicted without bos)")
        if self.distribution not in ("uniform", "skewed"):
            bad("distribution", f"must be 'uniform' or 'skewed', got {self.distribution!r}")
        top = math.log2(self.alphabet_size)
        if self.distribution == "skewed":
            if self.target_entropy is None or not 0 < self.target_entropy <= top + 1e-12:
                bad("target_entropy", f"skewed strings need a target in (0, {top:.4f}] bits, got {self.target_entropy}")
        elif self.target_entropy is not None:
            bad("target_entropy", "only applies to distribution=skewed")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be positive")
        self._check_unused(bad)
        if self.unlearn_learning_rate is None:
            self.unlearn_learning_rate = self.learning_rate
        if not self.unlearn_learning_rate > 0:
            bad("unlearn_learning_rate", "must be positive")
        if not 0 <= self.phase_margin < 1:
            bad("phase_margin", f"must lie in [0, 1), got {self.phase_margin}")
        self._check_experiments()
        if self.local_prefix_ks is not None:
            longest = self.string_length - 1
            if not self.local_prefix_ks or any(not 1 <= k < longest for k in self.local_prefix_ks):
                bad("local_prefix_ks", f"each k must lie in [1, {longest - 1}] (shorter than the longest context)")
            self.local_prefix_ks = sorted(set(self.local_prefix_ks))
        if self.deepspeed and not Path(self.deepspeed).is_file():
            bad("deepspeed", f"no such file {self.deepspeed}")

    def _check_unused(self, bad) -> None:
        """A setting only some experiments read, changed from its default while none of them runs,
        is refused (as ``unlearn`` refuses its methods' settings): it would be silently ignored."""
        running = {e.replace("-", "_") for e in self.experiment}
        defaults = {f.name: f.default for f in fields(self)}
        for name, readers in EXPERIMENT_SETTINGS.items():
            if getattr(self, name) != defaults[name] and not running & set(readers):
                bad(name, f"only applies with {param('experiment')} {' or '.join(readers)}")

    def _check_experiments(self) -> None:
        self.experiment = [e.replace("-", "_") for e in self.experiment]
        unknown = [e for e in self.experiment if e not in EXPERIMENTS]
        if unknown or not self.experiment:
            raise InputError(f"experiment: must be one or more of {', '.join(EXPERIMENTS)}, got {unknown or 'none'}")
        if "sequential" in self.experiment and len(set(self.experiment)) > 1:
            raise InputError("experiment: sequential trains its own schedule; run it on its own")
        if "sequential" in self.experiment and self.num_strings < 2:
            raise InputError("num_strings: sequential exposure needs at least 2 strings (A, B, ...)")
        if {"local_prefix", "global_context"} & set(self.experiment) and self.string_length < 3:
            raise InputError("string_length: the context probes need at least 3 characters")
        if "unlearning" in self.experiment:
            if self.unlearn_method not in UNLEARN_METHODS:
                raise InputError(
                    f"unlearn_method: must be one of {', '.join(UNLEARN_METHODS)}, got {self.unlearn_method!r}"
                )
            if self.string_length + int(self.bos) < MIN_UNLEARN_TOKENS:
                raise InputError(
                    f"string_length: the unlearning experiment scores EL_10, so strings need at least "
                    f"{MIN_UNLEARN_TOKENS} tokens (got {self.string_length + int(self.bos)})"
                )

    @property
    def trains_exposure(self) -> bool:
        return "sequential" not in self.experiment
