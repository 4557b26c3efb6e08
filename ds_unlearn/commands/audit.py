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

import argparse
import gc
from dataclasses import replace

from ..core import distributed as D
from ..core.adapters import check_adapter_dir
from ..core.audit import AuditSettings, audit, check_sets, compare, sequence_losses
from ..core.audit_report import AUDIT_OUTPUTS, JSONL, MARKDOWN, SUMMARY, write_audit
from ..core.config_parsing import one_line_errors, seed_arg
from ..core.data import DEFAULT_ID_FIELD, add_prompt_flags, duplicates_notes, prompt_options, read_rows, to_sequence_set
from ..core.ds_config import load_ds_config
from ..core.errors import InputError
from ..core.files import OVERWRITE_FLAG, check_output
from ..core.mia import (
    DEFAULT_ATTACK_CONFIDENCE,
    DEFAULT_ATTACK_SAMPLES,
    DEFAULT_BOOTSTRAP,
    DEFAULT_MIN_K,
    DEFAULT_PREFIX,
    DEFAULT_SUFFIX,
)
from ..core.models import DTYPES, load_config, load_for_inference, load_tokenizer, resolve_model_dir
from ..core.scorer import DEFAULT_BATCH_SIZE, DEFAULT_EL_N, DEFAULT_EXTRACT_K
from ..core.summary import add_threshold_flags, thresholds_from
from ..core.verdict import check_holdout_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-unlearn audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return one_line_errors(parser)


def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))


def suffix_length(text: str) -> int | None:
    """``--suffix_length``: a token count, or ``rest`` (None: everything after the prefix)."""
    return None if text == "rest" else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="checkpoint directory, Hub model id, or 'smollm2': the model audited")
    a("--adapter", default=None, help="a peft LoRA adapter directory to put on --model (not on --baseline)")
    a("--forget", required=True, help="the forget set (JSONL/CSV/Parquet; input_ids or a text field)")
    a("--holdout", default=None, help="text the model never saw, from the forget set's distribution (required)")
    a("--out", required=True, help="output directory")
    a("--baseline", default=None, help="the model before unlearning: audited too, change reported per sequence")
    a(
        "--reference",
        default=None,
        help="a reference model with the same tokenizer (commonly the model before fine-tuning): adds the 'ref' "
        "attack, loss minus the reference's loss (MIMIR)",
    )
    a(
        "--retrained",
        default=None,
        help="a model trained the same way without the forget set: AUCs under it, PrivLeak (MUSE) and forget "
        "quality (TOFU's KS-test p-value on the forget set's losses)",
    )
    a("--el_n", type=int, nargs="+", default=[DEFAULT_EL_N], help="n of EL_n (several allowed)")
    a("--extract_k", type=int, nargs="+", default=[DEFAULT_EXTRACT_K], help="K of k-extractability")
    a("--min_k", type=float, default=DEFAULT_MIN_K, help="fraction of tokens Min-K%% and Min-K%%++ average")
    a("--prefix_length", type=int, default=DEFAULT_PREFIX, help="sampling extraction: prefix tokens P")
    a("--suffix_length", type=suffix_length, default=DEFAULT_SUFFIX, help="suffix tokens S, or 'rest' (all after P)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    a("--top_k", type=int, default=None, help="top-k truncation (default off; generate()'s own default is 50)")
    a("--top_p", type=float, default=None, help="top-p (nucleus) truncation in (0, 1] (default off)")
    a("--attack_samples", type=int, default=DEFAULT_ATTACK_SAMPLES, help="attacker's sample budget n")
    a("--attack_confidence", type=float, default=DEFAULT_ATTACK_CONFIDENCE, help="success probability q")
    add_threshold_flags(a, calibrate=True)
    a("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples of each AUC (0: none)")
    # 42 is TrainingArguments' seed: the same as unlearn's end-of-run audit, so the two reproduce each other.
    a("--seed", type=seed_arg, default=42, help="seed of the bootstrap and the sampling (unlearn's default seed)")
    a("--eval_tasks", default=None, help="lm-eval tasks T1,T2 run on the model (needs the [eval] extra)")
    a("--eval_include_path", default=None, help="directory of the user's lm-eval task YAMLs")
    a("--eval_limit", type=float, default=None, help="documents per lm-eval task (count, or fraction < 1)")
    a("--eval_batch_size", type=int, default=8, help="lm-eval batch size")
    a("--max_length", type=int, default=None, help="truncate sequences to this many tokens")
    a("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences / continuations per forward")
    a("--text_field", default="text", help="field holding the text of a row")
    a("--id_field", default=DEFAULT_ID_FIELD, help="field holding a row's id (rows without 'id' are numbered)")
    add_prompt_flags(a)
    a("--dtype", choices=sorted(DTYPES), default="float32", help="dtype to load the model in")
    a("--deepspeed", default=None, help="DeepSpeed JSON config (ZeRO-3 loads partitioned)")
    a(OVERWRITE_FLAG, action="store_true", help="replace the outputs of an earlier audit in --out")
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by launchers


def settings_from(args) -> AuditSettings:
    return AuditSettings(
        el_n=tuple(args.el_n),
        extract_k=tuple(args.extract_k),
        min_k=args.min_k,
        prefix_length=args.prefix_length,
        suffix_length=args.suffix_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        attack_samples=args.attack_samples,
        attack_confidence=args.attack_confidence,
        bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def load_sets(args, model_dir, vocab_size, settings):
    """Forget and holdout as SequenceSets (+ the tokenizer), checked against each other."""
    rows = {name: read_rows(getattr(args, name), f"--{name}") for name in ("forget", "holdout")}
    tokenizer = load_tokenizer(model_dir)  # also decodes input_ids rows for the zlib score
    sets = {
        name: to_sequence_set(
            table,
            tokenizer=tokenizer,
            text_field=args.text_field,
            id_field=args.id_field,
            max_length=args.max_length,
            vocab_size=vocab_size,
            option=f"--{name}",
            **prompt_options(args),
        )
        for name, table in rows.items()
    }
    # Row indices stand in for ids when a file has no id field: those never clash by design.
    explicit = all(args.id_field in table[0] for table in rows.values())
    f, h = sets["forget"], sets["holdout"]
    check_sets(
        f.sequences,
        h.sequences,
        f.ids if explicit else None,
        h.ids if explicit else None,
        settings.min_tokens(),
        prompts=(f.prompt_lengths, h.prompt_lengths),
        settings=settings,
    )
    return sets, tokenizer, explicit


def run(args: argparse.Namespace) -> int:
    # The process entry (cli.main) owns the process group and the failure path.
    # Everything that can be wrong with the input is found here, before any weights load.
    if not args.holdout:
        raise InputError("--holdout: required (text the model never saw, like the forget set's)")
    model_dir = resolve_model_dir(args.model)
    baseline_dir = resolve_model_dir(args.baseline, "--baseline") if args.baseline else None
    companions = {
        name: resolve_model_dir(getattr(args, name), f"--{name}")
        for name in ("reference", "retrained")
        if getattr(args, name)
    }
    check_output(
        args.out,
        option="--out",
        overwrite=args.overwrite,
        inputs=(args.forget, args.holdout, model_dir, baseline_dir, args.adapter, *companions.values()),
        directory=True,
        owned=AUDIT_OUTPUTS,
    )
    if args.adapter is not None:
        check_adapter_dir(args.adapter)
    settings = settings_from(args)
    settings.validate()
    thresholds = thresholds_from(args, calibrate=True)
    ds_config = load_ds_config(args.deepspeed) if args.deepspeed else None
    vocab_size = load_config(model_dir).vocab_size
    if baseline_dir is not None and load_config(baseline_dir, "--baseline").vocab_size != vocab_size:
        raise InputError(f"--baseline: {args.baseline} has a different vocabulary size than --model")
    sets, tokenizer, explicit = load_sets(args, model_dir, vocab_size, settings)
    if any(s != "ma" or settings.greedy for s in thresholds.positional()):
        # Verdicts by position among the holdout: enough rows for the quantile, before any model loads.
        check_holdout_size(len(sets["holdout"]), thresholds.score_quantile, "--holdout")
    for name, directory in companions.items():
        check_same_vocabulary(f"--{name}", directory, vocab_size, tokenizer)
    tasks = _eval_tasks(args)
    manager = None
    if tasks or args.eval_include_path:
        from ..core.utility import check_eval_request

        manager = check_eval_request(
            tasks, args.eval_include_path, tokenizer, model_config=load_config(model_dir), limit=_limit(args.eval_limit)
        )
    for note in duplicates_notes(sets):  # after every check; a repeated holdout row counts twice in each AUC
        D.report_note(f"ds-unlearn audit: {note}")

    forget, holdout = (sets["forget"], sets["holdout"]) if explicit else _index_ids(sets)
    # One model in memory at a time: the reference's losses and the retrained model's audit are
    # computed first and handed to the audits of --baseline and --model as figures.
    reference = retrained = None
    if "reference" in companions:
        reference_model = load_for_inference(companions["reference"], DTYPES[args.dtype], ds_config)
        sequences = sets["forget"].sequences + sets["holdout"].sequences
        prompts = sets["forget"].prompts() + sets["holdout"].prompts()
        reference = sequence_losses(reference_model, sequences, settings.batch_size, prompts)
        del reference_model
        gc.collect()

    def audit_of(directory, adapter=None, **overrides):
        model = load_for_inference(directory, DTYPES[args.dtype], ds_config, adapter=adapter)
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
    model, result = audit_of(model_dir, args.adapter)
    if before is not None:
        result = compare(result, before)
    result.summary["model"] = str(args.model)
    result.summary["baseline_model"] = str(args.baseline) if args.baseline else None
    result.summary["reference_model"] = str(args.reference) if args.reference else None
    result.summary["retrained_model"] = str(args.retrained) if args.retrained else None
    result.summary["world_size"] = D.world_size()
    if tasks:
        from ..core.utility import run_eval

        result.summary["eval"] = run_eval(
            model,
            tokenizer,
            tasks,
            manager,
            limit=_limit(args.eval_limit),
            batch_size=args.eval_batch_size,
            seed=args.seed,
        )
    if D.is_main():
        write_audit(args.out, result)
        print("\n".join(summary_lines(result.summary)))
        print(f"wrote {JSONL}, {SUMMARY}, {MARKDOWN} and plots to {args.out}")
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


def _eval_tasks(args) -> list[str]:
    from ..core.utility import parse_tasks

    return parse_tasks(args.eval_tasks)


def _limit(value):
    return None if value is None else (int(value) if value >= 1 else value)


def _index_ids(sets):
    """Without an id field, rows are named by index; as plain lists they keep exactly that."""
    return sets["forget"].sequences, sets["holdout"].sequences


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
            + f"; forget quality (KS p-value) {summary['forget_quality']:.3g}"
        ]
        if "privleak" in summary
        else []
    )
