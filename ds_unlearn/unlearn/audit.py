"""The end-of-run audit of an unlearning run: membership inference and extraction under sampling,
before (the input checkpoint) and after (the unlearned model).

``run_unlearning`` calls ``audit_run`` once, after the model is saved. It writes
``audit_before.jsonl`` and ``audit_after.jsonl`` (per sequence, by id: the forget set, then the
non-members), returns the summaries that go into ``report.json`` under ``audit``, and logs
``audit/*`` scalars through ``Trainer.log`` (TensorBoard keeps the slash names as tags).
``--audit after`` leaves out the input checkpoint (no ``audit_before.jsonl``, no ``before``
entry): several runs from one checkpoint, such as the demo's methods, need its audit once;
``--audit none`` skips the audit.

Settings: the non-members are ``audit_holdout`` (text like the forget set's that the model never
saw), else ``holdout``; without either there is nothing to compare against and the audit is
skipped (said so in the report). Sampling extraction uses the first ``extract_k`` tokens as the
prefix and the rest of each sequence as the suffix (the sampling counterpart of
k-extractability), pure sampling (temperature 1, no truncation), 1000 samples, 50% confidence.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..core import distributed as D
from ..core.audit import AuditSettings, audit
from ..core.ds_config import load_ds_config, zero_stage
from ..core.errors import InputError
from ..core.files import write_jsonl
from ..core.mia import MIA_SCORES
from ..core.models import load_for_inference, load_tokenizer


def audit_settings(config) -> AuditSettings:
    return AuditSettings(
        prefix_length=config.extract_k,
        suffix_length=None,
        batch_size=config.score_batch_size,
        seed=config.seed,
        greedy=False,  # the run's own scores_before/after hold the greedy metrics
    )


def with_ids(result, forget_ids, nonmember_ids) -> list[dict]:
    """An audit's per-sequence rows, each named by its row id instead of its index in its set."""
    ids = {"forget": list(forget_ids), "holdout": list(nonmember_ids)}
    return [{**row, "id": ids[row["set"]][row["id"]]} for row in result.rows]


def summary_entry(result) -> dict:
    """An audit's summary as report.json keeps it under ``audit.before`` / ``audit.after``:
    MIA AUCs (with their intervals) and discoverable counts / log10 p under sampling."""
    s = result.summary
    return {
        "mia": s["mia"],
        "forget": {
            "discoverable": s["forget"]["sampling"]["discoverable"],
            "log10_p": s["forget"]["sampling"]["log10_p"],
        },
        "nonmember": {
            "discoverable": s["holdout"]["sampling"]["discoverable"],
            "log10_p": s["holdout"]["sampling"]["log10_p"],
        },
    }


def audit_run(config, model_dir, trainer, sets: dict) -> dict:
    """Audit the unlearned model (``trainer.model``) and the input checkpoint on the forget set
    against the non-members; collective (every rank calls it). Returns the ``audit`` entry of
    ``report.json``. A problem with the sets (e.g. a non-member identical to a forget sequence)
    skips the audit with the reason in the report rather than losing a finished run."""
    if config.audit == "none":
        return {"skipped": "--audit none"}
    name = "audit_holdout" if sets.get("audit_holdout") is not None else "holdout"
    nonmember = sets.get(name)
    if nonmember is None:
        return {"skipped": "no holdout set: membership inference needs text the model never saw"}
    settings = audit_settings(config)
    forget = sets["forget"]
    tokenizer = trainer.processing_class or load_tokenizer(model_dir)  # decodes tokens for zlib, as `audit` does
    run = lambda model: audit(
        model,
        forget.sequences,
        nonmember.sequences,
        settings=settings,
        thresholds=trainer.thresholds,
        tokenizer=tokenizer,
    )
    try:
        after = run(trainer.model)
    except InputError as err:
        return {"skipped": str(err)}
    results = {"after": after}
    if config.audit == "both":
        ds_config = load_ds_config(config.deepspeed) if config.deepspeed else None
        before_model = load_for_inference(
            model_dir, torch.float32, ds_config if zero_stage(ds_config) == 3 else None, adapter=config.adapter
        )
        results["before"] = run(before_model)
        del before_model
        gc.collect()

    out = Path(config.output_dir)
    files = {when: f"audit_{when}.jsonl" for when in ("before", "after") if when in results}
    if D.is_main():
        for when, file in files.items():
            write_jsonl(out / file, with_ids(results[when], forget.ids, nonmember.ids))
    entry = {
        "nonmembers": name,
        "settings": {k: v for k, v in after.summary["settings"].items() if k not in ("el_n", "extract_k", "greedy")},
        **{when: summary_entry(results[when]) for when in ("before", "after") if when in results},
        "files": list(files.values()),
    }
    metrics = {}
    for when in results:
        for score in MIA_SCORES:
            metrics[f"audit/auc_{score}_{when}"] = entry[when]["mia"][score]["auc"]
        metrics[f"audit/discoverable_{when}"] = entry[when]["forget"]["discoverable"]
    trainer.log(metrics)
    return entry
