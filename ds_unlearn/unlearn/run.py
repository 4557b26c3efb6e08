"""One unlearning run from an ``UnlearnConfig``: validate, load, train, save, report.

Called by ``ds-unlearn unlearn`` (and ``launch/unlearn.py`` on every rank) and by the demo. The
result keeps everything the caller needs in memory; the files it writes are outputs only.
"""

from __future__ import annotations

import shutil
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
    prompt_options,
    read_rows,
    to_sequence_set,
)
from ..core.ds_config import load_ds_config, zero_stage
from ..core.errors import InputError, flag, param
from ..core.files import (
    OutputLock,
    check_output,
    clear_outputs,
    is_write_error,
    partial_name,
    publish_directory,
    write_error,
    write_json,
)
from ..core.models import load_causal_lm, load_config, load_tokenizer, report_partition, resolve_model_dir
from ..core.scorer import min_length
from .audit import audit_run, check_audit_sets
from .config import UnlearnConfig
from .guard import check_written
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
        inputs=(model_dir, config.forget, config.retain, config.holdout, config.match_holdout, config.adapter),
        directory=True,
        owned=RUN_OUTPUTS,
    )


def load_sets(config: UnlearnConfig, model_dir: Path) -> tuple[dict[str, SequenceSet | None], Any]:
    """Forget, retain and holdout sets as token ids, validated before any model loads."""
    model_config = load_config(model_dir)
    vocab_size = model_config.vocab_size
    context = getattr(model_config, "max_position_embeddings", None)
    files = {"forget": config.forget, "retain": config.retain, "holdout": config.holdout}
    files["audit_holdout"] = config.audit_holdout  # the end-of-run audit's non-members
    files["match_holdout"] = config.match_holdout  # the match method's non-members (default: holdout)
    rows = {name: read_rows(path, param(name)) for name, path in files.items() if path}
    tokenizer = load_tokenizer(model_dir) if any(needs_tokenizer(r) for r in rows.values()) else None
    if tokenizer is not None and len(tokenizer) > vocab_size:
        # Its ids past the embedding have no row: a lookup error (or another token's row) mid-run.
        raise InputError(
            f"its tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size} "
            "rows (resize the embedding, or use the tokenizer the model was trained with)",
            field="model",
        )
    sets: dict[str, SequenceSet | None] = {name: None for name in files}
    for name, table in rows.items():
        data = to_sequence_set(
            table,
            tokenizer=tokenizer,
            text_field=config.text_field,
            id_field=config.id_field,
            max_length=config.max_length,
            vocab_size=vocab_size,
            option=param(name),
            **prompt_options(config),
        )
        # EL_10 and k-extractability must be defined (on the response, for rows with a prompt).
        needs = [min_length((10,), (config.extract_k,), p) for p in data.prompts()]
        short = next((i for i, (s, need) in enumerate(zip(data.sequences, needs)) if len(s) < need), None)
        if short is not None:
            prompt = data.prompts()[short]
            count = len(data.sequences[short]) - prompt
            what = f"{count} response tokens after its prompt" if prompt else f"{count} tokens"
            raise InputError(
                f"{param(name)} row {data.row(short)}: {what}, but EL_10 and "
                f"extract_k={config.extract_k} need at least {needs[short] - prompt}"
            )
        check_context(data, context, param(name))
        sets[name] = data
    for other in ("holdout", "audit_holdout", "match_holdout", "retain"):
        if sets[other] is not None:
            check_disjoint(sets["forget"], sets[other], ("forget", other))
    if sets["holdout"] is not None:
        match = sets["match_holdout"] or sets["holdout"]
        config.check_holdout(len(sets["holdout"]), len(match))
    check_audit_sets(config, sets)
    return sets, tokenizer


def launch_settings(args) -> dict:
    """What a resumable checkpoint's optimizer and weights depend on besides the rank count: the
    ZeRO stage, the precision, the method and the LoRA setting (``args``: an UnlearnConfig)."""
    ds = args.deepspeed
    if isinstance(ds, str) and not Path(ds).is_file():
        ds = None  # the saving run's config file is gone: its stage is read from the checkpoint instead
    stage = zero_stage(load_ds_config(ds)) if ds else None
    precision = "bf16" if getattr(args, "bf16", False) else ("fp16" if getattr(args, "fp16", False) else "fp32")
    lora = "off"
    if getattr(args, "adapter", None):
        lora = f"adapter {args.adapter}"
    elif getattr(args, "lora_r", 0):
        lora = f"r={args.lora_r} alpha={args.lora_alpha:g} targets={args.lora_target_modules or 'default'}"
    return {"ZeRO stage": stage, "precision": precision, "method": args.method, "LoRA": lora}


def check_resume_settings(config: UnlearnConfig) -> None:
    """A resumed run has the ZeRO stage, precision, method and LoRA setting of the run that saved
    the checkpoint (read from its ``training_args.bin``, the Trainer's own pickle of our config):
    another would load optimizer partitions or adapter tensors that do not fit, a DeepSpeed
    traceback on every rank. InputError naming both, before any model loads."""
    resume = config.resume_from_checkpoint
    if not isinstance(resume, str) or resume.lower() in ("true", "false"):
        return
    import torch

    saved_file = Path(resume) / "training_args.bin"
    if not saved_file.is_file():
        return
    try:
        saved = torch.load(saved_file, weights_only=False)
    except Exception:  # written by another version: the rank and epoch checks still apply
        return
    before, now = launch_settings(saved), launch_settings(config)
    if before["ZeRO stage"] is None and getattr(saved, "deepspeed", None):
        names = [p.name for p in Path(resume).glob("global_step*/*.pt")]
        zero3 = any(n.startswith("zero_pp_rank_") and "model_states" in n for n in names)
        before["ZeRO stage"] = 3 if zero3 else (now["ZeRO stage"] if now["ZeRO stage"] != 3 else "1 or 2")
    diff = [k for k in now if before[k] != now[k]]
    if diff:
        k = diff[0]
        raise InputError(
            f"resume_from_checkpoint: {resume} was saved with {k} {before[k]} and this run has {k} {now[k]}; "
            "resume it with the settings it was saved with"
        )


def run_unlearning(config: UnlearnConfig, *args, **kwargs) -> UnlearnResult:
    """Unlearn ``config.forget`` from ``config.model`` (``_unlearn``), holding a lock on
    ``output_dir`` from the moment every check passed to the end (a second run into it is refused
    in one line); collective (every rank calls it)."""
    lock = OutputLock(config.output_dir)
    try:
        # The first collective, before anything that could fail on one rank only: a folder another
        # run holds is refused on every rank alike, before any check reads the files it is writing.
        # (Every rank probes before this job's rank 0 can take the lock, so none sees its own.)
        if D.any_rank(lock.held()):
            raise InputError(_in_use(config, lock))
        return _unlearn(lock, config, *args, **kwargs)
    finally:
        lock.release()


def _in_use(config: UnlearnConfig, lock: OutputLock) -> str:
    held_by = f" (process {lock.holder})" if lock.holder else ""
    return f"output_dir: {config.output_dir} is in use by another run{held_by}; wait for it or choose another"


def lock_output(lock: OutputLock, config: UnlearnConfig) -> None:
    """Rank 0 takes ``output_dir``'s lock and every rank learns the outcome in one collective: all
    refuse in one line, or all go on. A rank that stopped before it (its own error line says why)
    closes its connections; the others then stop with one line too instead of a gloo traceback."""
    try:
        refused = D.any_rank(D.is_main() and not lock.acquire())
    except RuntimeError as err:  # torch's DistBackendError: the peer left, or the wait timed out
        if not any(why in str(err) for why in ("closed by peer", "reset by peer")):
            raise
        raise InputError("another rank stopped before the output lock was taken (its error line says why)") from None
    if refused:
        raise InputError(_in_use(config, lock))
    if lock.unsupported:
        D.report_note(f"ds-unlearn unlearn: note: {config.output_dir} cannot be locked ({lock.unsupported})")


def _unlearn(lock: OutputLock, config: UnlearnConfig, thresholds=None, audit_cache=None) -> UnlearnResult:
    """Unlearn ``config.forget`` from ``config.model``; collective (every rank calls it).

    ``thresholds``: a ``core.verdict.Thresholds`` to judge by instead of the config's (the demo
    gives the one calibrated on its never-planted records); positional scores it lacks values for
    are calibrated on the holdout. ``audit_cache``: an ``unlearn.audit.CompanionCache`` shared
    by the runs of one process that audit against the same reference / retrained models (the
    demo's methods). Raises InputError (before any output is written) for bad paths
    or data."""
    started = time.time()
    config.check_files()  # what the settings name on disk (building the config read none of it)
    model_dir = resolve_model_dir(config.model)
    check_paths(config, model_dir)
    check_resume_settings(config)
    if config.merge_adapter:
        checkpoint_shards(model_dir)  # a local safetensors checkpoint, or one line now
    sets, tokenizer = load_sets(config, model_dir)
    if config.uses_lora:
        check_lora(load_config(model_dir), config)

    # Every check that needs no weights has passed: lock output_dir before the model loads, held
    # until the run returns (run_unlearning releases it; the OS does if the process dies).
    lock_output(lock, config)

    from transformers import set_seed

    from .trainer import UnlearnTrainer

    # --seed covers everything that draws random numbers, the adapters' initialisation included
    # (built before the Trainer, which seeds again for training).
    set_seed(config.seed)
    # Built after UnlearnConfig: under ZeRO-3 its DeepSpeed config makes this load partitioned.
    model = load_causal_lm(model_dir)
    use_cache = getattr(model.config, "use_cache", None)  # the Trainer sets it to False for training
    report_partition(model)
    if config.uses_lora:  # adapters on the frozen base; checked against the model before any output
        model = prepare_model(model, config)
        if config.merge_adapter:
            check_merge_targets(model_dir, adapted_weight_names(model))
    # After every check: bad input still ends in its one line. Each note is a line of the command.
    for note in duplicates_notes(sets, flag):
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
        match=(sets["match_holdout"] or sets["holdout"]) if config.declared.matches else None,
    )
    trainer.given_thresholds = thresholds
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    resumable = None
    if trainer.run.phase != "done" and config.save_resumable:
        # The epoch limit came before the stop rule: keep a checkpoint to resume from with a
        # higher limit (before finalize_weights, which applies TA/TAU's edit for the output).
        resumable = _save_resumable(trainer)
    trainer.finalize_weights()
    if use_cache is not None:  # the saved model generates as the input did (with its KV cache)
        trainer.model.config.use_cache = use_cache

    out = Path(config.output_dir)
    if config.uses_lora:
        save_adapters(trainer.model, out, trainer.adapter_edit)
        if config.merge_adapter and D.is_main():
            merge_into_checkpoint(model_dir, out / ADAPTER_DIR, out / "model")
    else:
        _save_full_model(trainer, out / "model", model_dir, tokenizer)
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
    # The guard: what was written, loaded as a user will, scores as the run judged it (one forward).
    D.barrier()  # rank 0's writes are complete before any rank reads them
    dtype = next(trainer.model.parameters()).dtype
    report["guard"] = check_written(config, model_dir, out, sets["forget"], after, dtype)
    if not report["guard"]["ok"]:
        D.report_note(f"ds-unlearn unlearn: error: {report['guard']['error']}")
    # The end-of-run audit: membership inference and sampling extraction, before and after (unlearn/audit.py).
    report["audit"] = audit_run(config, model_dir, trainer, sets, cache=audit_cache)
    if D.is_main():
        write_json(out / REPORT, report)
    return UnlearnResult(report, list(sets["forget"].ids), trainer.run.scores_before, after)


def _save_full_model(trainer, path: Path, model_dir, tokenizer) -> None:
    """``model/``, complete or absent: every rank writes (collectively, under ZeRO-3) into its
    temporary sibling, rank 0 adds the tokenizer and renames it. A write error (a full disk)
    removes the temporary and names what was not written; earlier outputs stay as they were."""
    tmp = partial_name(path)
    try:
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if D.is_main():
            if tokenizer is None:  # input_ids data: ship the checkpoint's tokenizer
                tokenizer = load_tokenizer(model_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            publish_directory(tmp, path)
    except Exception as err:
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(err):
            raise write_error(path, err) from err
        raise


def _save_resumable(trainer) -> Path:
    """``trainer.save_resumable_checkpoint()``; a write error (a full disk) removes the partial
    checkpoint (it would lack ``unlearn_state.json`` and be refused anyway) and names it."""
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    existed = checkpoint.exists()
    try:
        return trainer.save_resumable_checkpoint()
    except Exception as err:
        if not is_write_error(err):
            raise
        if not existed and D.is_main():
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise write_error(checkpoint, err) from err
