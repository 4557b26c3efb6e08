"""``ds-unlearn audit``: prove, sequence by sequence, that a forget set is gone.

One process: ``ds-unlearn audit --model DIR --forget F --holdout H --out DIR``. Many ranks:
``deepspeed --num_gpus N launch/audit.py <same arguments> --deepspeed configs/ds/zero3.json``
(sequences sharded over ranks, gathered per sequence; rank 0 writes).

Per sequence: every greedy metric of ``score``, the membership scores (loss, zlib, Min-K%,
Min-K%++; ``ref`` with --reference) and their percentile within the holdout, the
sampling-extraction probability (Hayes et al. 2024) and a verdict. Per set: ROC AUC forget vs
holdout with a bootstrap interval and its two-sided reading, TPR at 0.1% / 1% / 5% FPR (Carlini
et al. 2022); with --retrained, each AUC under the retrained model, MUSE's PrivLeak and TOFU's
forget quality. Outputs in --out: audit.jsonl, audit.json, audit.md, mia_histograms.png,
log10p_vs_ma.png, roc.png.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, fields, replace

from ..core import distributed as D
from ..core.adapters import check_adapter_dir
from ..core.audit import AuditSettings, audit, check_sets, compare, sequence_losses
from ..core.audit_report import AUDIT_OUTPUTS, JSONL, MARKDOWN, SUMMARY, write_audit
from ..core.data import duplicates_notes, prompt_options, read_rows, to_sequence_set
from ..core.ds_config import load_ds_config
from ..core.errors import InputError, flag, param
from ..core.files import check_output
from ..core.mia import DEFAULT_SUFFIX
from ..core.models import DTYPES, load_config, load_for_inference, load_tokenizer, resolve_model_dir
from ..core.seeds import seed_problem
from ..core.verdict import check_holdout_size
from .options import CalibrationOptions, DataOptions, ModelOptions
from .parsing import option, parse_config, print_help

PROG = "ds-unlearn audit"
REST = "rest"  # --suffix_length rest: the suffix is all of a sequence after its prefix


@dataclass(frozen=True, kw_only=True)
class AuditConfig(AuditSettings, DataOptions, ModelOptions, CalibrationOptions):
    """Every setting of ``ds-unlearn audit``; each field is a flag of the same name. The audit's
    own settings are ``AuditSettings``' fields (declared there, with their help); ``settings()``
    hands them to ``core.audit.audit``."""

    model: str = option(help="checkpoint directory, Hub model id, or 'smollm2': the model audited")
    adapter: str | None = option(None, "a peft LoRA adapter directory to put on --model (not on --baseline)")
    forget: str = option(help="the forget set (JSONL/CSV/Parquet; input_ids or a text field)")
    holdout: str | None = option(None, "text the model never saw, from the forget set's distribution (required)")
    out: str = option(help="output directory")
    baseline: str | None = option(None, "the model before unlearning: audited too, change reported per sequence")
    reference: str | None = option(
        None,
        "a reference model with the same tokenizer (commonly the model before fine-tuning): adds the 'ref' "
        "attack, loss minus the reference's loss (MIMIR)",
    )
    retrained: str | None = option(
        None,
        "a model trained the same way without the forget set: AUCs and TPRs under it, AUC - AUC_retrained with "
        "a paired bootstrap interval, PrivLeak (MUSE) and forget quality (TOFU's KS-test p-value on the forget "
        "set's losses)",
    )
    # Two settings read differently on the command line: a word for "all the rest", and
    # TrainingArguments' seed (unlearn's end-of-run audit uses it: the two reproduce each other).
    suffix_length: int | str | None = option(DEFAULT_SUFFIX, f"suffix tokens S, or '{REST}' (all after P)")
    seed: int = option(42, "seed of the bootstrap and the sampling (unlearn's default seed)")
    greedy: bool = field(default=True, init=False)  # the command audits every model greedily
    eval_tasks: str | None = option(None, "lm-eval tasks T1,T2 run on the model (needs the [eval] extra)")
    eval_include_path: str | None = option(None, "directory of the user's lm-eval task YAMLs")
    eval_limit: float | None = option(None, "documents per lm-eval task (count, or fraction < 1)")
    eval_batch_size: int = option(8, "lm-eval batch size")
    overwrite: bool = option(False, "replace the outputs of an earlier audit in --out")

    def __post_init__(self):
        """Lists to tuples, ``rest`` to None; then every setting is checked (InputError, one line)."""
        object.__setattr__(self, "el_n", tuple(self.el_n))
        object.__setattr__(self, "extract_k", tuple(self.extract_k))
        object.__setattr__(self, "suffix_length", _suffix_length(self.suffix_length))
        if seed_problem(self.seed):
            raise InputError(f"argument --seed: {seed_problem(self.seed)}")
        if not self.holdout:
            raise InputError("required (text the model never saw, like the forget set's)", field="holdout")
        self.settings().validate()
        self.thresholds()

    def settings(self) -> AuditSettings:
        """The audit's settings, as ``core.audit.audit`` takes them."""
        return AuditSettings(**{f.name: getattr(self, f.name) for f in fields(AuditSettings)})


def _suffix_length(value: int | str | None) -> int | None:
    """``--suffix_length``: a token count, or ``rest`` (None: everything after the prefix)."""
    if value is None or value == REST:
        return None
    try:
        return int(value) if not isinstance(value, bool | float) else int("")
    except ValueError:
        raise InputError(f"argument --suffix_length: invalid suffix_length value: {str(value)!r}") from None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print_help(AuditConfig, PROG, __doc__)
        return 0
    return run(parse_config(AuditConfig, argv, prog=PROG))


def load_sets(config: AuditConfig, model_dir, vocab_size, settings: AuditSettings):
    """Forget and holdout as SequenceSets (+ the tokenizer), checked against each other."""
    rows = {name: read_rows(getattr(config, name), param(name)) for name in ("forget", "holdout")}
    tokenizer = load_tokenizer(model_dir)  # also decodes input_ids rows for the zlib score
    sets = {
        name: to_sequence_set(
            table,
            tokenizer=tokenizer,
            text_field=config.text_field,
            id_field=config.id_field,
            max_length=config.max_length,
            vocab_size=vocab_size,
            option=param(name),
            **prompt_options(config),
        )
        for name, table in rows.items()
    }
    # Row indices stand in for ids when a file has no id field: those never clash by design.
    explicit = all(config.id_field in table[0] for table in rows.values())
    f, h = sets["forget"], sets["holdout"]
    check_sets(
        f.sequences,
        h.sequences,
        f.ids if explicit else None,
        h.ids if explicit else None,
        settings.min_tokens(),
        prompts=(f.prompt_lengths, h.prompt_lengths),
        settings=settings,
        rows=(f.rows, h.rows),
    )
    return sets, tokenizer, explicit


def run(config: AuditConfig) -> int:
    # The process entry (cli.main) owns the process group and the failure path.
    # Everything that can be wrong with the input is found here, before any weights load.
    model_dir = resolve_model_dir(config.model)
    baseline_dir = resolve_model_dir(config.baseline, param("baseline")) if config.baseline else None
    companions = {
        name: resolve_model_dir(getattr(config, name), param(name))
        for name in ("reference", "retrained")
        if getattr(config, name)
    }
    check_output(
        config.out,
        option=param("out"),
        overwrite=config.overwrite,
        inputs=(config.forget, config.holdout, model_dir, baseline_dir, config.adapter, *companions.values()),
        directory=True,
        owned=AUDIT_OUTPUTS,
    )
    if config.adapter is not None:
        check_adapter_dir(config.adapter)
    settings = config.settings()
    thresholds = config.thresholds()
    ds_config = load_ds_config(config.deepspeed) if config.deepspeed else None
    vocab_size = load_config(model_dir).vocab_size
    if baseline_dir is not None and load_config(baseline_dir, param("baseline")).vocab_size != vocab_size:
        raise InputError(f"{config.baseline} has a different vocabulary size than --model", field="baseline")
    sets, tokenizer, explicit = load_sets(config, model_dir, vocab_size, settings)
    if any(s != "ma" or settings.greedy for s in thresholds.positional()):
        # Verdicts by position among the holdout: enough rows for the quantile, before any model loads.
        check_holdout_size(len(sets["holdout"]), thresholds.score_quantile, param("holdout"))
    for name, directory in companions.items():
        check_same_vocabulary(param(name), directory, vocab_size, tokenizer)
    tasks = _eval_tasks(config)
    manager = None
    if tasks or config.eval_include_path:
        from ..core.utility import check_eval_request

        manager = check_eval_request(
            tasks,
            config.eval_include_path,
            tokenizer,
            model_config=load_config(model_dir),
            limit=_limit(config.eval_limit),
        )
    for note in duplicates_notes(sets, flag):  # after every check; a repeated holdout row counts twice in each AUC
        D.report_note(f"ds-unlearn audit: {note}")

    forget, holdout = (sets["forget"], sets["holdout"]) if explicit else _index_ids(sets)
    # One model in memory at a time: the reference's losses and the retrained model's audit are
    # computed first and handed to the audits of --baseline and --model as figures.
    reference = retrained = None
    if "reference" in companions:
        reference_model = load_for_inference(companions["reference"], DTYPES[config.dtype], ds_config)
        sequences = sets["forget"].sequences + sets["holdout"].sequences
        prompts = sets["forget"].prompts() + sets["holdout"].prompts()
        reference = sequence_losses(reference_model, sequences, settings.batch_size, prompts)
        del reference_model
        gc.collect()

    def audit_of(directory, adapter=None, **overrides):
        model = load_for_inference(directory, DTYPES[config.dtype], ds_config, adapter=adapter)
        result = audit(
            model,
            forget,
            holdout,
            settings=replace(settings, **overrides),
            thresholds=thresholds,
            tokenizer=tokenizer,
            progress=True,
            reference=reference,
            retrained=retrained,
            prompt_lengths=(sets["forget"].prompt_lengths, sets["holdout"].prompt_lengths),
        )
        return model, result

    if "retrained" in companions:
        retrained_model, retrained = audit_of(companions["retrained"], greedy=False)
        del retrained_model
        gc.collect()
    before = None
    if baseline_dir is not None:
        baseline_model, before = audit_of(baseline_dir)
        del baseline_model
        gc.collect()
    model, result = audit_of(model_dir, config.adapter)
    if before is not None:
        result = compare(result, before)
    result.summary["model"] = str(config.model)
    result.summary["baseline_model"] = str(config.baseline) if config.baseline else None
    result.summary["reference_model"] = str(config.reference) if config.reference else None
    result.summary["retrained_model"] = str(config.retrained) if config.retrained else None
    result.summary["world_size"] = D.world_size()
    if tasks:
        from ..core.utility import run_eval

        result.summary["eval"] = run_eval(
            model,
            tokenizer,
            tasks,
            manager,
            limit=_limit(config.eval_limit),
            batch_size=config.eval_batch_size,
            seed=config.seed,
        )
    if D.is_main():
        write_audit(config.out, result)
        print("\n".join(summary_lines(result.summary)))
        print(f"wrote {JSONL}, {SUMMARY}, {MARKDOWN} and plots to {config.out}")
    return 0


def check_same_vocabulary(option: str, directory, vocab_size: int, tokenizer) -> None:
    """A --reference or --retrained checkpoint scores the same token ids as --model: the same
    vocabulary size, and, when both ship a tokenizer, the same token-to-id map. InputError (one
    line) otherwise; reads configs and tokenizers only, never weights."""
    theirs = load_config(directory, option).vocab_size
    if theirs != vocab_size:
        raise InputError(
            f"{option}: {directory} has a vocabulary of {theirs} tokens, --model {vocab_size} "
            "(it must share --model's tokenizer)"
        )
    other = load_tokenizer(directory) if tokenizer is not None else None
    if other is not None and other.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"{option}: {directory} ships another tokenizer than --model (token ids differ)")


def _eval_tasks(config) -> list[str]:
    from ..core.utility import parse_tasks

    return parse_tasks(config.eval_tasks)


def _limit(value):
    return None if value is None else (int(value) if value >= 1 else value)


def _index_ids(sets):
    """Without an id field, rows are named by index; as plain lists they keep exactly that."""
    return sets["forget"].sequences, sets["holdout"].sequences


def _indistinguishable(differences: dict) -> str:
    if any(d["ci95"] is None for d in differences.values()):
        return "n/a (bootstrap 0: no interval)"
    return ", ".join(s for s, d in differences.items() if d["indistinguishable"]) or "none"


def summary_lines(summary: dict) -> list[str]:
    """A few lines for stdout (counts and AUCs only: never any text)."""
    f = summary["forget"]
    aucs = ", ".join(f"{s} {entry['auc']:.3f}" for s, entry in summary["mia"].items())
    verdicts = ", ".join(f"{k} {v}" for k, v in f["verdicts"].items())
    return [
        f"forget ({f['count']} sequences): {verdicts}",
        f"membership AUC forget vs holdout ({summary['holdout']['count']} holdout sequences): {aucs}",
        f"discoverable under sampling: forget {f['sampling']['discoverable']}, "
        f"holdout {summary['holdout']['sampling']['discoverable']}",
    ] + (
        [
            "PrivLeak vs the retrained model: "
            + ", ".join(f"{s} {'n/a' if v is None else f'{v:.1f}%'}" for s, v in summary["privleak"].items())
            + f"; forget quality (KS p-value) {summary['forget_quality']:.3g}",
            "attacks whose AUC is within noise of their AUC under the retrained model (the paired 95% interval "
            f"of AUC - AUC_retrained holds 0): {_indistinguishable(summary.get('auc_difference', {}))}",
        ]
        if "privleak" in summary
        else []
    )
