"""The memorisation lab on a real model: exposure, the context probes, sequential exposure and
unlearning dynamics.

Training is ``SequenceTrainer``'s (the upstream Trainer and its DeepSpeed integration) driven by
an epoch schedule, and unlearning is ``UnlearnTrainer`` itself; ``EpochRecorder`` measures every
string at the start and after every epoch (``lab_probes.measure``, collective on every rank).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..core import distributed as D
from ..core.models import load_causal_lm
from ..unlearn.loop import SequenceTrainer
from .config import LabConfig
from .dynamics import (
    default_ks,
    entropy_bits,
    shared_contexts,
)
from .probes import global_context, local_prefix, measure
from .strings import LabStrings


class EpochRecorder(TrainerCallback):
    """Measures the strings before training and after every epoch; logs lab/* scalars and
    prints one line per epoch (instead of the Trainer's raw log dicts)."""

    def __init__(self, trainer, strings: LabStrings, label: str):
        self.trainer, self.strings, self.label = trainer, strings, label
        self.history: list[dict] = []
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(self)

    def _record(self) -> None:
        record = {"epoch": len(self.history), **measure(self.trainer.model, self.strings)}
        self.history.append(record)
        accuracy, loss = float(np.mean(record["accuracy"])), float(np.mean(record["loss"]))
        self.trainer.log(
            {
                "lab/accuracy": accuracy,
                "lab/loss": loss,
                "lab/control_accuracy": record["control_accuracy"],
                "lab/control_loss": record["control_loss"],
                **{f"lab/string{i}/accuracy": a for i, a in enumerate(record["accuracy"][:MAX_STRING_SCALARS])},
            }
        )
        if D.is_main():
            print(
                f"{self.label} epoch {record['epoch']}: accuracy {accuracy:.3f} (control "
                f"{record['control_accuracy']:.3f}), loss {loss:.3f} (control {record['control_loss']:.3f})",
                flush=True,
            )

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
        # The sampler asks once at the start of each epoch (epochs may end early: count them).
        self.epochs_begun = getattr(self, "epochs_begun", -1) + 1
        return self.schedule[min(self.epochs_begun, len(self.schedule) - 1)]


def training_arguments(config: LabConfig, output_dir: Path, epochs: int):
    from transformers import TrainingArguments

    extra = {}
    # DeepSpeed on CPU: the command entry prepared accelerate's gloo state (commands/process.py).
    if config.deepspeed and D.uses_configured_state():
        extra["accelerator_config"] = {"use_configured_state": True}
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=config.learning_rate,
        # Constant: a decaying rate would bend the phases the lab is there to see.
        lr_scheduler_type="constant",
        weight_decay=0.0,
        per_device_train_batch_size=config.per_device_train_batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to=["tensorboard"],
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=config.seed,
        deepspeed=config.deepspeed,
        **extra,
    )


def train_schedule(
    config: LabConfig,
    strings: LabStrings,
    model_dir: Path,
    tokenizer,
    schedule: list[list[int]],
    log_dir: Path,
    label: str,
):
    """Fine-tune the model through the schedule; returns the trainer and the epoch records."""
    args = training_arguments(config, log_dir, len(schedule))
    model = load_causal_lm(model_dir)  # after the arguments: under ZeRO-3 it loads partitioned
    trainer = ScheduleTrainer(
        model=model, args=args, train_sequences=strings.train_sequences, schedule=schedule, processing_class=tokenizer
    )
    recorder = EpochRecorder(trainer, strings, label)
    trainer.train()
    return trainer, recorder.history


# -- experiments ----------------------------------------------------------------------------------
CANARIES = "canaries.jsonl"
STAGE_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def sequential_stages(num_strings: int) -> list[tuple[str, int]]:
    """A, B, C, ... one after another, then A again."""
    names = [STAGE_NAMES[i] if i < len(STAGE_NAMES) else f"S{i}" for i in range(num_strings)]
    return [(name, i) for i, name in enumerate(names)] + [(f"{names[0]} again", 0)]


def run_lab(config: LabConfig, strings: LabStrings, model_dir: Path, tokenizer, out: Path) -> dict:
    """Every requested experiment; returns their results (collective: all ranks call it)."""
    from .results import exposure_phases, sequential_summary

    results: dict = {}
    margin = config.phase_margin
    if config.trains_exposure:
        schedule = [list(range(len(strings.train)))] * config.epochs
        trainer, history = train_schedule(
            config, strings, model_dir, tokenizer, schedule, out / "tensorboard" / "exposure", "exposure"
        )
        shared = shared_contexts(strings.train, strings.keep)
        results["exposure"] = {"epochs": history, "phases": exposure_phases(history, strings.predicted, margin, shared)}
        ks = config.local_prefix_ks or default_ks(config.string_length - 1)
        if "local_prefix" in config.experiment:
            results["local_prefix"] = local_prefix(trainer.model, strings, ks)
        if "global_context" in config.experiment:
            results["global_context"] = global_context(trainer.model, strings, ks, config.seed)
    else:
        stages = sequential_stages(len(strings.train))
        schedule = [[i] for _, i in stages for _ in range(config.epochs)]
        trainer, history = train_schedule(
            config, strings, model_dir, tokenizer, schedule, out / "tensorboard" / "sequential", "sequential"
        )
        summary = sequential_summary(history, stages, config.epochs, strings.predicted, margin)
        results["sequential"] = {"epochs": history, **summary}
    if config.save_model or "unlearning" in config.experiment:
        save_canaries(trainer, strings, out)
    del trainer  # the unlearning run loads its own copy (and DeepSpeed engine) from out/model
    gc.collect()  # the Trainer, its optimizer state and the model sit in reference cycles
    if "unlearning" in config.experiment:
        results["unlearning"] = run_unlearning(config, strings, out, tokenizer, history)
    return results


def save_canaries(trainer, strings: LabStrings, out: Path) -> None:
    """The trained model, and its strings as a forget set the scorer and the trainer accept."""
    from ..core.files import write_jsonl

    trainer.save_model(str(out / "model"))  # collective under ZeRO-3 (gathers the weights)
    if D.is_main():
        write_jsonl(
            out / CANARIES,
            (
                {"id": f"canary-{i:03d}", "text": strings.text(s), "input_ids": seq}
                for i, (s, seq) in enumerate(zip(strings.train, strings.train_sequences))
            ),
        )
    D.barrier()


def run_unlearning(config: LabConfig, strings: LabStrings, out: Path, tokenizer, exposure: list[dict]) -> dict:
    """Unlearn the memorised strings with UnlearnTrainer (GA or SGA) and record every epoch as
    exposure did. It stops like Jang et al.: once the mean accuracy is below the unseen strings'."""
    from ..core.data import load_sequence_set
    from ..unlearn.config import UnlearnConfig
    from ..unlearn.trainer import UnlearnTrainer
    from .results import unlearning_summary

    control_level = exposure[-1]["control_accuracy"]
    args = UnlearnConfig(
        model=str(out / "model"),
        forget=str(out / CANARIES),
        output_dir=str(out / "unlearn"),
        method=config.unlearn_method,
        learning_rate=config.unlearn_learning_rate,
        num_train_epochs=config.unlearn_epochs,
        stop_rule="mean",
        mean_threshold=control_level,
        extract_k=8,
        per_device_train_batch_size=config.per_device_train_batch_size,
        save_strategy="no",
        disable_tqdm=True,
        seed=config.seed,
        deepspeed=config.deepspeed,
        **(
            {"accelerator_config": {"use_configured_state": True}}
            if config.deepspeed and D.uses_configured_state()
            else {}
        ),
    )
    forget = load_sequence_set(out / CANARIES, option=CANARIES)
    if config.deepspeed:
        # accelerate refuses a second DeepSpeed Accelerator in one process while the first one's
        # state lives on; the exposure trainer is finished with it (the process group stays).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    model = load_causal_lm(out / "model")  # after the arguments: under ZeRO-3 it loads partitioned
    trainer = UnlearnTrainer(model=model, args=args, forget=forget, processing_class=tokenizer)
    # Added after the trainer's own monitor, so it records the weights the monitor kept.
    recorder = EpochRecorder(trainer, strings, f"unlearning ({config.unlearn_method})")
    trainer.train()
    entropy_nats = entropy_bits(strings.probabilities) * float(np.log(2))
    summary = unlearning_summary(recorder.history, exposure, strings.predicted, config.phase_margin, entropy_nats)
    return {
        "method": config.unlearn_method,
        "stop_threshold": control_level,
        "stop_reason": trainer.run.stop_reason,
        "epochs": recorder.history,
        **summary,
    }
