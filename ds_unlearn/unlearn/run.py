"""One unlearning run from an ``UnlearnConfig``: validate, load, train, save, report.

Called by ``ds-unlearn unlearn`` (and ``launch/unlearn.py`` on every rank) and by the demo. The
result keeps everything the caller needs in memory; the files it writes are outputs only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core import distributed as D
from ..core.adapters import check_merge_targets, checkpoint_shards, merge_into_checkpoint
from ..core.data import (
    SequenceSet,
    check_context,
    check_disjoint,
    duplicates_notes,
    needs_tokenizer,
    read_rows,
    to_sequence_set,
)
from ..core.errors import InputError
from ..core.files import check_output, clear_outputs, write_json
from ..core.models import load_causal_lm, load_config, load_tokenizer, report_partition, resolve_model_dir
from .audit import audit_run
from .config import UnlearnConfig
from .lora import (
    ADAPTER_DIR,
    TV_BASE_DIR,
    TV_TRAINED_DIR,
    adapted_weight_names,
    check_lora,
    prepare_model,
    save_adapters,
)
from .report import REPORT, build_report

# What a run writes directly under output_dir (names or glob patterns). An earlier run's, even a
# crashed one without report.json, needs --overwrite, which removes these and nothing else.
RUN_OUTPUTS = (
    REPORT,
    "model",
    "scores_*.jsonl",
    "audit_*.jsonl",
    "checkpoint-*",
    "runs",  # TensorBoard's event files
    ADAPTER_DIR,
    TV_BASE_DIR,
    TV_TRAINED_DIR,
)


@dataclass
class UnlearnResult:
    """What a finished run holds: its report (as written to report.json) and the forget set's
    per-sequence scores before and after, in forget-set order."""

    report: dict
    forget_ids: list[Any]
    scores_before: list[dict]
    scores_after: list[dict]


def check_paths(config: UnlearnConfig, model_dir: Path) -> None:
    """The input checkpoint and data are never written to, and earlier results are not
    clobbered (a resume continues its own run)."""
    check_output(
        config.output_dir,
        option="output_dir",
        overwrite=config.overwrite or bool(config.resume_from_checkpoint),
        inputs=(model_dir, config.forget, config.retain, config.holdout, config.adapter),
        directory=True,
        owned=RUN_OUTPUTS,
    )


def load_sets(config: UnlearnConfig, model_dir: Path) -> tuple[dict[str, SequenceSet | None], Any]:
    """Forget, retain and holdout sets as token ids, validated before any model loads."""
    model_config = load_config(model_dir)
    vocab_size = model_config.vocab_size
    context = getattr(model_config, "max_position_embeddings", None)
    need = max(11, config.extract_k + 1)  # EL_10 and k-extractability must be defined
    files = {"forget": config.forget, "retain": config.retain, "holdout": config.holdout}
    files["audit_holdout"] = config.audit_holdout  # issue 13: the end-of-run audit's non-members
    rows = {name: read_rows(path, f"--{name}") for name, path in files.items() if path}
    tokenizer = load_tokenizer(model_dir) if any(needs_tokenizer(r) for r in rows.values()) else None
    sets: dict[str, SequenceSet | None] = {name: None for name in files}
    for name, table in rows.items():
        data = to_sequence_set(
            table,
            tokenizer=tokenizer,
            text_field=config.text_field,
            id_field=config.id_field,
            max_length=config.max_length,
            vocab_size=vocab_size,
            option=f"--{name}",
        )
        short = next((i for i, s in enumerate(data.sequences) if len(s) < need), None)
        if short is not None:
            raise InputError(
                f"--{name} row {short}: {len(data.sequences[short])} tokens, but EL_10 and "
                f"extract_k={config.extract_k} need at least {need}"
            )
        check_context(data, context, f"--{name}")
        sets[name] = data
    for other in ("holdout", "audit_holdout", "retain"):
        if sets[other] is not None:
            check_disjoint(sets["forget"], sets[other], ("forget", other))
    return sets, tokenizer


def run_unlearning(config: UnlearnConfig) -> UnlearnResult:
    """Unlearn ``config.forget`` from ``config.model``; collective (every rank calls it).

    Raises InputError (before any output is written) for bad paths or data."""
    started = time.time()
    model_dir = resolve_model_dir(config.model)
    check_paths(config, model_dir)
    if config.merge_adapter:
        checkpoint_shards(model_dir)  # a local safetensors checkpoint, or one line now
    sets, tokenizer = load_sets(config, model_dir)
    if config.uses_lora:
        check_lora(load_config(model_dir), config)

    from .trainer import UnlearnTrainer

    # Built after UnlearnConfig: under ZeRO-3 its DeepSpeed config makes this load partitioned.
    model = load_causal_lm(model_dir)
    use_cache = getattr(model.config, "use_cache", None)  # the Trainer sets it to False for training
    report_partition(model)
    if config.uses_lora:  # adapters on the frozen base; checked against the model before any output
        model = prepare_model(model, config)
        if config.merge_adapter:
            check_merge_targets(model_dir, adapted_weight_names(model))
    for note in duplicates_notes(sets):  # after every check: bad input still ends in its one line
        D.report_note(f"ds-unlearn unlearn: {note}")
    if config.overwrite and not config.resume_from_checkpoint and D.is_main():
        # Every check has passed: replace the earlier run now, so no file of it mixes with this one's.
        clear_outputs(config.output_dir, RUN_OUTPUTS)
    trainer = UnlearnTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        forget=sets["forget"],
        retain=sets["retain"],
        holdout=sets["holdout"],
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    resumable = None
    if trainer.run.phase != "done" and config.save_resumable:
        # The epoch limit came before the stop rule: keep a checkpoint to resume from with a
        # higher limit (before finalize_weights, which applies TA/TAU's edit for the output).
        resumable = trainer.save_resumable_checkpoint()
    trainer.finalize_weights()
    if use_cache is not None:  # the saved model generates as the input did (with its KV cache)
        trainer.model.config.use_cache = use_cache

    out = Path(config.output_dir)
    if config.uses_lora:
        save_adapters(trainer.model, out, trainer.adapter_edit)
        if config.merge_adapter and D.is_main():
            merge_into_checkpoint(model_dir, out / ADAPTER_DIR, out / "model")
    else:
        trainer.save_model(str(out / "model"))
    if tokenizer is None and D.is_main() and (out / "model").is_dir():  # input_ids data: ship the tokenizer
        input_tokenizer = load_tokenizer(model_dir)
        if input_tokenizer is not None:
            input_tokenizer.save_pretrained(out / "model")
    after = trainer.score_set(sets["forget"])
    trainer.write_scores("scores_after.jsonl", after)
    trainer.log_saved_model_scores(after)
    holdout_after = trainer.holdout_loss()
    retain_after = (
        float(np.mean([r["ma"] for r in trainer.score_set(sets["retain"], el=False)]))
        if sets["retain"] is not None
        else None
    )
    report = build_report(config, trainer, after, holdout_after, retain_after, time.time() - started)
    report["resumable_checkpoint"] = str(resumable) if resumable is not None else None
    # Issue 13: membership inference and sampling extraction, before and after (unlearn/audit.py).
    report["audit"] = audit_run(config, model_dir, trainer, sets)
    if D.is_main():
        write_json(out / REPORT, report)
    return UnlearnResult(report, list(sets["forget"].ids), trainer.run.scores_before, after)
