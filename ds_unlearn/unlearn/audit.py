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

Verdicts: each audited model's records are judged by position among that model's own scores
of the non-members (``audit(recalibrate=True)``), the question the AUCs ask, where the run's
verdict is positional and the non-members are enough for its quantile (else by the run's
thresholds, calibrated under the input model, as its stop rule judges). The summaries carry the
forget set's verdict counts and the thresholds they came from.

``reference`` adds the reference-model attack (``ref``) and ``retrained`` the figures against a
model trained without the forget set (AUCs under it, PrivLeak, forget quality), as
``ds-unlearn audit --reference / --retrained`` computes them; each is loaded, used once and freed
before the audits, so at most one more model than the trainer's is alive at a time. Runs in one
process that audit against the same companions (the demo's methods) can share a
``CompanionCache``: each companion is computed by the first run and reused by every run whose
audit asks exactly the same of it.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..core import distributed as D
from ..core.audit import AuditSettings, audit, check_sets, sequence_losses
from ..core.ds_config import load_ds_config, zero_stage
from ..core.errors import InputError, param
from ..core.files import write_jsonl
from ..core.models import load_config, load_for_inference, load_tokenizer, resolve_model_dir
from ..core.verdict import min_holdout_rows

COMPANIONS = ("reference", "retrained")  # the config fields naming the audit's extra models
RETRAINED_KEYS = (
    "mia_retrained",
    "tpr_at_fpr_retrained",
    "privleak",
    "auc_difference",
    "forget_quality",
    "forget_quality_ks",
)


def companion_problem(config, path: str, name: str) -> str | None:
    """Why ``config``'s ``reference`` / ``retrained`` model (``path``, field ``name``) cannot serve
    the end-of-run audit, or None: the audit must run and have non-members, and the model must
    load (config only, no weights) with the vocabulary of ``config.model``. For
    ``UnlearnConfig.validate``, before anything loads."""
    if config.audit == "none":
        return "not read with audit none (the end-of-run audit is off)"
    if not (config.audit_holdout or config.holdout):
        return f"the end-of-run audit needs non-members: pass {param('audit_holdout')} or {param('holdout')}"
    try:
        theirs = load_config(resolve_model_dir(path, name), name).vocab_size
        mine = load_config(resolve_model_dir(config.model), "model").vocab_size
    except InputError as err:
        return str(err).removeprefix(f"{name}: ")
    if theirs != mine:
        model = param("model")
        return f"{path} has a vocabulary of {theirs} tokens, {model} {mine} (it must share {model}'s tokenizer)"
    return None


def audit_settings(config, greedy: bool = False) -> AuditSettings:
    """The end-of-run audit's settings from an ``UnlearnConfig``. ``greedy``: also the greedy
    metrics (the run's own scores_before/after hold the forget set's; the non-members' MA is
    needed to judge the records by position among them), as the run scores them between epochs:
    k-extractability at ``extract_k``, no EL_n (greedy generation the verdict does not read)."""
    return AuditSettings(
        prefix_length=config.extract_k,
        suffix_length=None,
        batch_size=config.score_batch_size,
        seed=config.seed,
        greedy=greedy,
        el_n=(),
        extract_k=(config.extract_k,),
    )


def own_verdicts(config, thresholds, nonmember) -> bool:
    """Whether the end-of-run audit judges each model's records among its own scores of the
    non-members (``audit(recalibrate=True)``): the verdict is positional, the non-members
    (a ``SequenceSet``) are enough rows to place a record at its quantile
    (``verdict.min_holdout_rows``), and each is long enough for the greedy metrics (MA by position
    needs theirs). Otherwise the audit judges by the run's thresholds."""
    greedy = audit_settings(config, greedy=True)
    return (
        bool(thresholds.positional())
        and len(nonmember.sequences) >= min_holdout_rows(thresholds.score_quantile)
        and all(len(seq) >= greedy.min_tokens(p) for seq, p in zip(nonmember.sequences, nonmember.prompts()))
    )


def nonmember_set(sets: dict) -> tuple[str, object | None]:
    """The end-of-run audit's non-members: ``audit_holdout`` when given, else ``holdout``, as
    (field name, SequenceSet or None)."""
    name = "audit_holdout" if sets.get("audit_holdout") is not None else "holdout"
    return name, sets.get(name)


def check_audit_sets(config, sets: dict) -> None:
    """The end-of-run audit can run on these sets (``core.audit.check_sets``: at least 2 rows
    each for the AUCs' intervals, every row long enough for sampling extraction): checked in
    ``load_sets`` so that a set too small for the audit is refused before training, not found
    after it. Raises InputError naming the field and row; a no-op with ``audit none`` or without
    non-members (the audit is then skipped, said so in the report)."""
    name, nonmember = nonmember_set(sets)
    if config.audit == "none" or nonmember is None:
        return
    settings = audit_settings(config)
    forget = sets["forget"]
    check_sets(
        forget.sequences,
        nonmember.sequences,
        min_tokens=settings.min_tokens(),
        prompts=(forget.prompt_lengths, nonmember.prompt_lengths),
        settings=settings,
        names=("forget", name),
        rows=(forget.rows, nonmember.rows),
    )


def with_ids(result, forget_ids, nonmember_ids) -> list[dict]:
    """An audit's per-sequence rows, each named by its row id instead of its index in its set."""
    ids = {"forget": list(forget_ids), "holdout": list(nonmember_ids)}
    return [{**row, "id": ids[row["set"]][row["id"]]} for row in result.rows]


def summary_entry(result) -> dict:
    """An audit's summary as report.json keeps it under ``audit.before`` / ``audit.after``:
    MIA AUCs (with their intervals and two-sided reading), TPR at low FPR, the forget set's verdict
    counts with the thresholds they used, discoverable counts / log10 p under sampling, and with a
    retrained model ``RETRAINED_KEYS``."""
    s = result.summary
    return {
        "mia": s["mia"],
        "tpr_at_fpr": s["tpr_at_fpr"],
        "verdicts": s["forget"]["verdicts"],
        "thresholds": s["thresholds"],
        **{k: s[k] for k in RETRAINED_KEYS if k in s},
        "forget": {
            "discoverable": s["forget"]["sampling"]["discoverable"],
            "log10_p": s["forget"]["sampling"]["log10_p"],
        },
        "nonmember": {
            "discoverable": s["holdout"]["sampling"]["discoverable"],
            "log10_p": s["holdout"]["sampling"]["log10_p"],
        },
    }


class CompanionCache:
    """The companion models' figures (the reference model's losses, the retrained model's audit),
    kept for the runs of one process that audit against them. An entry is reused only by an audit
    with the same companion model path, input checkpoint, settings, thresholds, verdict placement
    and sequences (its key), so a reused figure is the one that audit would compute. Per process: every rank of a
    launched job holds its own, filled and read in the same order."""

    def __init__(self):
        self._entries: list[tuple[tuple, object]] = []

    def get(self, key: tuple):
        """The figure computed under ``key``, or None."""
        return next((value for k, value in self._entries if k == key), None)

    def put(self, key: tuple, value) -> None:
        self._entries.append((key, value))


def audit_run(config, model_dir, trainer, sets: dict, cache: CompanionCache | None = None) -> dict:
    """Audit the unlearned model (``trainer.model``) and the input checkpoint on the forget set
    against the non-members; collective (every rank calls it). Returns the ``audit`` entry of
    ``report.json``. The sets were checked before training (``check_audit_sets``); a problem
    found only here still skips the audit with the reason in the report rather than losing a
    finished run. ``cache``: companion figures shared with earlier runs of this process (the
    entry's ``companions`` says per companion whether it was computed or reused)."""
    if config.audit == "none":
        return {"skipped": "--audit none"}
    name, nonmember = nonmember_set(sets)
    if nonmember is None:
        return {"skipped": "no holdout set: membership inference needs text the model never saw"}
    thresholds = trainer.thresholds
    recalibrate = own_verdicts(config, thresholds, nonmember)
    settings = audit_settings(config, greedy=recalibrate and "ma" in thresholds.positional())
    forget = sets["forget"]
    tokenizer = trainer.processing_class or load_tokenizer(model_dir)  # decodes tokens for zlib, as `audit` does
    ds_config = load_ds_config(config.deepspeed) if config.deepspeed else None
    load = lambda directory, adapter=None: load_for_inference(
        directory, torch.float32, ds_config if zero_stage(ds_config) == 3 else None, adapter=adapter
    )
    companions = {"reference": None, "retrained": None}
    run = lambda model: audit(
        model,
        forget.sequences,
        nonmember.sequences,
        settings=settings,
        thresholds=thresholds,
        tokenizer=tokenizer,
        prompt_lengths=(forget.prompt_lengths, nonmember.prompt_lengths),
        recalibrate=recalibrate,
        **companions,
    )
    # What a companion's figure depends on besides its model (the input checkpoint: its tokenizer
    # decodes for zlib): a cached one is reused only under all of it. A path's model is taken to
    # stay as it is between the runs of one process.
    asked = (str(model_dir), settings, thresholds, recalibrate, forget.sequences, nonmember.sequences)
    asked += (forget.prompt_lengths, nonmember.prompt_lengths)
    how = {}
    try:
        if config.reference:
            key = ("reference", str(config.reference), *asked)
            companions["reference"] = cache.get(key) if cache is not None else None
            how["reference"] = "reused" if companions["reference"] is not None else "computed"
            if companions["reference"] is None:
                reference_model = load(resolve_model_dir(config.reference, "reference"))
                sequences, prompts = forget.sequences + nonmember.sequences, forget.prompts() + nonmember.prompts()
                companions["reference"] = sequence_losses(reference_model, sequences, settings.batch_size, prompts)
                del reference_model
                gc.collect()
                if cache is not None:
                    cache.put(key, companions["reference"])
        if config.retrained:
            # Its audit reads the reference losses too: they are part of what it depends on.
            key = ("retrained", str(config.retrained), str(config.reference), *asked)
            cached = cache.get(key) if cache is not None else None
            how["retrained"] = "reused" if cached is not None else "computed"
            if cached is None:
                retrained_model = load(resolve_model_dir(config.retrained, "retrained"))
                cached = run(retrained_model)
                del retrained_model
                gc.collect()
                if cache is not None:
                    cache.put(key, cached)
            companions["retrained"] = cached
        after = run(trainer.model)
    except InputError as err:
        return {"skipped": str(err)}
    results = {"after": after}
    if config.audit == "both":
        before_model = load(model_dir, config.adapter)
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
        **{f"{c}_model": getattr(config, c) for c in COMPANIONS if getattr(config, c)},
        **({"companions": how} if how else {}),
        "settings": {k: v for k, v in after.summary["settings"].items() if k not in ("el_n", "extract_k", "greedy")},
        **{when: summary_entry(results[when]) for when in ("before", "after") if when in results},
        "files": list(files.values()),
    }
    metrics = {}
    for when in results:
        for score, figures in entry[when]["mia"].items():
            metrics[f"audit/auc_{score}_{when}"] = figures["auc"]
        for score, value in entry[when].get("privleak", {}).items():
            if value is not None:
                metrics[f"audit/privleak_{score}_{when}"] = value
        if "forget_quality" in entry[when]:
            metrics[f"audit/forget_quality_{when}"] = entry[when]["forget_quality"]
        differences = entry[when].get("auc_difference", {})
        if differences and all(d["ci95"] is not None for d in differences.values()):
            # How many attacks cannot tell the forget set from the retrained model's (paired 95%).
            metrics[f"audit/attacks_at_retrained_{when}"] = sum(d["indistinguishable"] for d in differences.values())
        metrics[f"audit/discoverable_{when}"] = entry[when]["forget"]["discoverable"]
    trainer.log(metrics)
    return entry
