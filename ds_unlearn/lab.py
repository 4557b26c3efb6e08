"""The memorisation lab on a real model: exposure, the context probes, sequential exposure and
unlearning dynamics.

Training is ``SequenceTrainer``'s (the upstream Trainer and its DeepSpeed integration) driven by
an epoch schedule, and unlearning is ``UnlearnTrainer`` itself; ``EpochRecorder`` measures every
string at the start and after every epoch. Measurements are sharded over ranks and gathered on
all of them, with the same number of forward calls everywhere, so ZeRO-3 never hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import TrainerCallback

from . import distributed as D
from .dynamics import (
    chance_level,
    character_distribution,
    different_distribution,
    entropy_bits,
    local_windows,
    map_symbols,
    replaced_contexts,
    sample_strings,
    smallest_k,
    string_entropy_bits,
)
from .errors import InputError
from .generation import teacher_forced_rows
from .lab_config import LabConfig
from .models import load_causal_lm
from .training import SequenceTrainer

MEASURE_BATCH = 64  # sequences per forward pass when measuring (strings are short)


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
        rows = lambda strings, prefix: [  # noqa: E731
            {"id": f"{prefix}-{i:03d}", "text": self.text(s), "entropy_bits": string_entropy_bits(s),
             "chance_level": chance_level(s)} for i, s in enumerate(strings)]
        return {
            "symbols": self.symbols, "token_ids": self.token_ids, "leading_space": self.leading_space,
            "bos_token_id": self.bos_id,
            "distribution": {"probabilities": self.probabilities.tolist(),
                             "entropy_bits": entropy_bits(self.probabilities),
                             "chance_level": float(self.probabilities.max())},
            "train": rows(self.train, "canary"), "control": rows(self.control, "control"),
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


# -- measuring (collective: every rank calls these with the same arguments) ---------------------
def teacher_forced(model, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(match row, NLL row) of every sequence: contiguous equal shards per rank (the last padded
    with repeats), so every rank runs the same number of forward passes; gathered on all ranks."""
    per_rank = -(-len(sequences) // D.world_size())
    start = D.rank() * per_rank
    mine = [sequences[min(start + j, len(sequences) - 1)] for j in range(per_rank)]
    was_training = model.training
    model.eval()
    try:
        rows = []
        for i in range(0, len(mine), MEASURE_BATCH):
            rows.extend(teacher_forced_rows(model, mine[i : i + MEASURE_BATCH]))
    finally:
        model.train(was_training)
    return [row for shard in D.all_gather_objects(rows) for row in shard][: len(sequences)]


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
        "positions": [m.astype(int).tolist() for m, _ in train],
    }


class EpochRecorder(TrainerCallback):
    """Measures the strings before training and after every epoch; logs lab/* scalars."""

    def __init__(self, trainer, strings: LabStrings):
        self.trainer, self.strings = trainer, strings
        self.history: list[dict] = []

    def _record(self) -> None:
        record = {"epoch": len(self.history), **measure(self.trainer.model, self.strings)}
        self.history.append(record)
        self.trainer.log({
            "lab/accuracy": float(np.mean(record["accuracy"])), "lab/loss": float(np.mean(record["loss"])),
            "lab/control_accuracy": record["control_accuracy"], "lab/control_loss": record["control_loss"],
            **{f"lab/string{i}/accuracy": a for i, a in enumerate(record["accuracy"][:MAX_STRING_SCALARS])},
        })

    def on_train_begin(self, args, state, control, **kwargs):
        self._record()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._record()


MAX_STRING_SCALARS = 8  # per-string TensorBoard curves stay readable; dynamics.json has them all


# -- training -------------------------------------------------------------------------------------
class ScheduleTrainer(SequenceTrainer):
    """Trains, in epoch e, the strings ``schedule[e]`` names: all of them for exposure, one after
    another for sequential exposure. One Trainer, one optimizer, one DeepSpeed engine."""

    def __init__(self, *args, schedule: list[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule

    def epoch_rows(self) -> list[int]:
        # The sampler asks at the start of each epoch, when state.epoch is the epoch's index.
        return self.schedule[min(int(round(self.state.epoch or 0)), len(self.schedule) - 1)]


def training_arguments(config: LabConfig, output_dir: Path, epochs: int):
    from transformers import TrainingArguments

    extra = {}
    # DeepSpeed on CPU: accelerate must see the gloo group before TrainingArguments (REFERENCE §4).
    if config.deepspeed and D.prepare_accelerate_for_deepspeed():
        extra["accelerator_config"] = {"use_configured_state": True}
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=config.learning_rate,
        # Constant: a decaying rate would bend the phases the lab is there to see.
        lr_scheduler_type="constant", weight_decay=0.0,
        per_device_train_batch_size=config.per_device_train_batch_size, logging_steps=1,
        save_strategy="no", report_to=["tensorboard"], remove_unused_columns=False, disable_tqdm=True,
        seed=config.seed, deepspeed=config.deepspeed, **extra,
    )


def train_schedule(config: LabConfig, strings: LabStrings, model_dir: Path, tokenizer,
                   schedule: list[list[int]], log_dir: Path):
    """Fine-tune the model through the schedule; returns the trainer and the epoch records."""
    args = training_arguments(config, log_dir, len(schedule))
    model = load_causal_lm(model_dir)  # after the arguments: under ZeRO-3 it loads partitioned
    trainer = ScheduleTrainer(model=model, args=args, train_sequences=strings.train_sequences,
                              schedule=schedule, processing_class=tokenizer)
    recorder = EpochRecorder(trainer, strings)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder.history


# -- probes of the trained model ----------------------------------------------------------------
def local_prefix(model, strings: LabStrings, ks: Sequence[int]) -> dict:
    """Accuracy when each prediction sees only the last k characters of its context."""
    sequences = strings.train_sequences
    full = [m for m, _ in teacher_forced(model, sequences)]
    probes = [(i, k, j, p) for k in ks for i, s in enumerate(sequences)
              for j, p in local_windows(s, k, strings.keep).items()]
    answers = last_predictions(model, [p for *_, p in probes])
    rows = {k: [m.copy() for m in full] for k in ks}  # positions with short contexts keep their answer
    for (i, k, j, _), correct in zip(probes, answers):
        rows[k][i][j] = correct
    accuracy = [float(np.mean([r.mean() for r in rows[k]])) for k in ks]
    full_accuracy = float(np.mean([m.mean() for m in full]))
    return {"ks": list(ks), "accuracy": accuracy, "full_accuracy": full_accuracy,
            "k_90": smallest_k(ks, accuracy, full_accuracy)}


def global_context(model, strings: LabStrings, ks: Sequence[int], seed: int) -> dict:
    """Accuracy at the positions whose context is longer than k, when the context before the
    last k characters is kept, dropped (local only), or replaced by fresh characters from the
    same distribution or from a different one."""
    rng = np.random.default_rng([seed, 1])
    sequences = strings.train_sequences
    length = len(strings.train[0])
    full = [m for m, _ in teacher_forced(model, sequences)]
    sources = {"same_distribution": strings.probabilities,
               "different_distribution": different_distribution(strings.probabilities)}
    fresh = {name: [strings.sequence(s)[strings.keep :] for s in sample_strings(p, length, len(sequences), rng)]
             for name, p in sources.items()}
    probes = []  # (k, variant, string, position, probe)
    for k in ks:
        for i, seq in enumerate(sequences):
            probes += [(k, "local_only", i, j, p) for j, p in local_windows(seq, k, strings.keep).items()]
            for name in sources:
                probes += [(k, name, i, j, p) for j, p in replaced_contexts(seq, k, strings.keep, fresh[name][i]).items()]
    answers = last_predictions(model, [p[-1] for p in probes])
    results = []
    for k in ks:
        hits = {name: [] for name in ("local_only", *sources)}
        for (pk, name, i, j, _), correct in zip(probes, answers):
            if pk == k:
                hits[name].append(correct)
        positions = [(i, j) for (pk, name, i, j, _) in probes if pk == k and name == "local_only"]
        results.append({"k": k, "positions": len(positions),
                        "full": float(np.mean([full[i][j] for i, j in positions])),
                        **{name: float(np.mean(v)) for name, v in hits.items()}})
    return {"different_distribution": sources["different_distribution"].tolist(), "by_k": results}


# -- experiments ----------------------------------------------------------------------------------
CANARIES = "canaries.jsonl"
STAGE_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def sequential_stages(num_strings: int) -> list[tuple[str, int]]:
    """A, B, C, ... one after another, then A again."""
    names = [STAGE_NAMES[i] if i < len(STAGE_NAMES) else f"S{i}" for i in range(num_strings)]
    return [(name, i) for i, name in enumerate(names)] + [(f"{names[0]} again", 0)]


def run_lab(config: LabConfig, strings: LabStrings, model_dir: Path, tokenizer, out: Path) -> dict:
    """Every requested experiment; returns their results (collective: all ranks call it)."""
    from .dynamics import default_ks
    from .lab_results import exposure_phases, sequential_summary

    results: dict = {}
    margin = config.phase_margin
    if config.trains_exposure:
        schedule = [list(range(len(strings.train)))] * config.epochs
        trainer, history = train_schedule(config, strings, model_dir, tokenizer, schedule, out / "tensorboard" / "exposure")
        results["exposure"] = {"epochs": history, "phases": exposure_phases(history, strings.predicted, margin)}
        ks = config.local_prefix_ks or default_ks(config.string_length - 1)
        if "local_prefix" in config.experiment:
            results["local_prefix"] = local_prefix(trainer.model, strings, ks)
        if "global_context" in config.experiment:
            results["global_context"] = global_context(trainer.model, strings, ks, config.seed)
    else:
        stages = sequential_stages(len(strings.train))
        schedule = [[i] for _, i in stages for _ in range(config.epochs)]
        trainer, history = train_schedule(config, strings, model_dir, tokenizer, schedule, out / "tensorboard" / "sequential")
        results["sequential"] = {"epochs": history, **sequential_summary(history, stages, config.epochs,
                                                                         strings.predicted, margin)}
    if config.save_model or "unlearning" in config.experiment:
        save_canaries(trainer, strings, out)
    del trainer  # the unlearning run loads its own copy (and DeepSpeed engine) from out/model
    if "unlearning" in config.experiment:
        results["unlearning"] = run_unlearning(config, strings, out, tokenizer, history)
    return results


def save_canaries(trainer, strings: LabStrings, out: Path) -> None:
    """The trained model, and its strings as a forget set the scorer and the trainer accept."""
    from .files import write_jsonl

    trainer.save_model(str(out / "model"))  # collective under ZeRO-3 (gathers the weights)
    if D.is_main():
        write_jsonl(out / CANARIES, ({"id": f"canary-{i:03d}", "text": strings.text(s), "input_ids": seq}
                                     for i, (s, seq) in enumerate(zip(strings.train, strings.train_sequences))))
    D.barrier()


def run_unlearning(config: LabConfig, strings: LabStrings, out: Path, tokenizer, exposure: list[dict]) -> dict:
    """Unlearn the memorised strings with UnlearnTrainer (GA or SGA) and record every epoch as
    exposure did. It stops like Jang et al.: once the mean accuracy is below the unseen strings'."""
    from .data import load_sequence_set
    from .lab_results import unlearning_summary
    from .trainer import UnlearnTrainer
    from .unlearn_config import UnlearnConfig

    control_level = exposure[-1]["control_accuracy"]
    args = UnlearnConfig(
        model=str(out / "model"), forget=str(out / CANARIES), output_dir=str(out / "unlearn"),
        method=config.unlearn_method, learning_rate=config.unlearn_learning_rate,
        num_train_epochs=config.unlearn_epochs, stop_rule="mean", mean_threshold=control_level,
        extract_k=8, per_device_train_batch_size=config.per_device_train_batch_size,
        save_strategy="no", disable_tqdm=True, seed=config.seed, deepspeed=config.deepspeed,
    )
    forget = load_sequence_set(out / CANARIES, option=CANARIES)
    model = load_causal_lm(out / "model")  # after the arguments: under ZeRO-3 it loads partitioned
    trainer = UnlearnTrainer(model=model, args=args, forget=forget, processing_class=tokenizer)
    recorder = EpochRecorder(trainer, strings)
    trainer.add_callback(recorder)  # after the trainer's own monitor: it records what the monitor kept
    trainer.train()
    entropy_nats = entropy_bits(strings.probabilities) * float(np.log(2))
    return {"method": config.unlearn_method, "stop_threshold": control_level, "stop_reason": trainer.run.stop_reason,
            "epochs": recorder.history,
            **unlearning_summary(recorder.history, exposure, strings.predicted, config.phase_margin, entropy_nats)}
