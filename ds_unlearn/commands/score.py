"""``ds-unlearn score``: per-sequence memorization of a model on a data file.

One process: ``ds-unlearn score --model DIR --data FILE --out FILE.jsonl``. Many ranks:
``deepspeed --num_gpus N launch/score.py <same arguments> --deepspeed configs/ds/zero3.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core import distributed as D
from ..core.adapters import check_adapter_dir
from ..core.config_parsing import one_line_errors
from ..core.data import (
    DEFAULT_ID_FIELD,
    add_prompt_flags,
    check_context,
    needs_tokenizer,
    prompt_options,
    read_rows,
    to_sequence_set,
)
from ..core.ds_config import load_ds_config
from ..core.errors import InputError
from ..core.files import OVERWRITE_FLAG, check_output, write_json, write_jsonl
from ..core.models import DTYPES, load_config, load_for_inference, load_tokenizer, resolve_model_dir
from ..core.scorer import (
    AUTO,
    DEFAULT_EL_N,
    DEFAULT_EXTRACT_K,
    context_limit,
    min_length,
    score_sequences,
    validate_request,
)
from ..core.summary import add_threshold_flags, summarize_scores, summary_lines, thresholds_from


class _Help(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default (when it has one) after its help."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{action.help} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-unlearn score", description=__doc__.replace("``", ""), formatter_class=_Help
    )
    add_arguments(parser)
    return one_line_errors(parser)


def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory, Hub model id, or 'smollm2'")
    parser.add_argument("--adapter", default=None, help="a peft LoRA adapter directory to put on --model")
    parser.add_argument("--data", required=True, help="JSONL, CSV or Parquet file of sequences")
    parser.add_argument("--out", required=True, help="output JSONL, one line per input row")
    parser.add_argument("--el_n", type=int, nargs="+", default=[DEFAULT_EL_N], help="n of EL_n (several allowed)")
    parser.add_argument("--extract_k", type=int, nargs="+", default=[DEFAULT_EXTRACT_K], help="K of k-extractability")
    parser.add_argument("--max_length", type=int, default=None, help="truncate sequences to this many tokens")
    parser.add_argument(
        "--batch_size",
        type=_batch_size,
        default=AUTO,
        help="sequences / continuations per forward, or 'auto' (sized from free memory)",
    )
    parser.add_argument("--text_field", default="text", help="field holding the text of a row")
    parser.add_argument(
        "--id_field", default=DEFAULT_ID_FIELD, help="field holding a row's id (rows without 'id' are numbered)"
    )
    add_prompt_flags(parser.add_argument)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype to load the model in")
    parser.add_argument("--method", choices=["fast", "reference"], default="fast", help="EL_n algorithm")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ZeRO-3 loads partitioned)")
    parser.add_argument(
        "--zero3_gather",
        choices=["auto", "once", "per_forward"],
        default="auto",
        help="ZeRO-3: gather the full model once for scoring, or every layer on each forward; "
        "auto gathers once when the model fits in a quarter of free memory",
    )
    add_threshold_flags(parser.add_argument)
    parser.add_argument(OVERWRITE_FLAG, action="store_true", help="replace existing output files")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by launchers


def _batch_size(value: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return size


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.stem
    return out.with_name(f"{stem}.summary.json")


def run(args: argparse.Namespace) -> int:
    # The process entry (cli.main) owns the process group and the failure path.
    # Everything that can be wrong with the input is found here, before any weights load.
    model_dir = resolve_model_dir(args.model)
    inputs = (args.data, model_dir, args.adapter)
    check_output(args.out, option="--out", overwrite=args.overwrite, inputs=inputs)  # first: "." has no name
    check_output(summary_path(args.out), option="--out", overwrite=args.overwrite, inputs=inputs)
    ds_config = load_ds_config(args.deepspeed) if args.deepspeed else None
    if args.adapter is not None:
        check_adapter_dir(args.adapter)
    if args.max_length is not None and args.max_length < min_length(args.el_n, args.extract_k):
        raise InputError(
            f"--max_length {args.max_length} is shorter than el_n/extract_k need "
            f"({min_length(args.el_n, args.extract_k)} tokens)"
        )
    thresholds = thresholds_from(args)
    model_config = load_config(model_dir)
    vocab_size = model_config.vocab_size
    rows = read_rows(args.data)
    tokenizer = load_tokenizer(model_dir) if needs_tokenizer(rows) else None
    data = to_sequence_set(
        rows,
        tokenizer=tokenizer,
        text_field=args.text_field,
        id_field=args.id_field,
        max_length=args.max_length,
        vocab_size=vocab_size,
        **prompt_options(args),
    )
    check_context(data, context_limit(model_config))
    validate_request(
        data.sequences,
        args.el_n,
        args.extract_k,
        vocab_size,
        lambda i: f"--data row {i}",
        prompt_lengths=data.prompt_lengths,
    )

    model = load_for_inference(model_dir, DTYPES[args.dtype], ds_config, adapter=args.adapter)
    scores = score_sequences(
        model,
        data.sequences,
        el_n=args.el_n,
        extract_k=args.extract_k,
        batch_size=args.batch_size,
        method=args.method,
        progress=True,
        gather_params={"auto": None, "once": True, "per_forward": False}[args.zero3_gather],
        prompt_lengths=data.prompt_lengths,
    )
    if D.is_main():
        write_scores(args.out, data.ids, scores)
        summary = summarize_scores(scores, thresholds)
        write_json(summary_path(args.out), summary)
        print("\n".join(summary_lines(summary)))
        print(f"wrote {args.out} and {summary_path(args.out)}")
    return 0


def write_scores(path, ids, scores) -> None:
    write_jsonl(path, ({"id": row_id, **row} for row_id, row in zip(ids, scores)))
