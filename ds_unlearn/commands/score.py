"""``ds-unlearn score``: per-sequence memorization of a model on a data file.

One process: ``ds-unlearn score --model DIR --data FILE --out FILE.jsonl``. Many ranks:
``deepspeed --num_gpus N launch/score.py <same arguments> --deepspeed configs/ds/zero3.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import distributed as D
from ..core.adapters import check_adapter_dir
from ..core.data import check_context, needs_tokenizer, prompt_options, read_rows, to_sequence_set
from ..core.ds_config import load_ds_config
from ..core.errors import InputError, param
from ..core.files import check_output, write_json, write_jsonl
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
from ..core.summary import summarize_scores, summary_lines
from .options import DataOptions, ModelOptions, ThresholdOptions
from .parsing import option, parse_config, print_help

PROG = "ds-unlearn score"
GATHER = {"auto": None, "once": True, "per_forward": False}  # --zero3_gather: gather_params of score_sequences


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(DataOptions, ModelOptions, ThresholdOptions):
    """Every setting of ``ds-unlearn score``; each field is a flag of the same name."""

    model: str = option(help="Hugging Face checkpoint directory, Hub model id, or 'smollm2'")
    adapter: str | None = option(None, "a peft LoRA adapter directory to put on --model")
    data: str = option(help="JSONL, CSV or Parquet file of sequences")
    out: str = option(help="output JSONL, one line per input row")
    el_n: list[int] = option([DEFAULT_EL_N], "n of EL_n (several allowed)")
    extract_k: list[int] = option([DEFAULT_EXTRACT_K], "K of k-extractability")
    batch_size: int | str = option(AUTO, "sequences / continuations per forward, or 'auto' (sized from free memory)")
    method: str = option("fast", "EL_n algorithm", choices=["fast", "reference"])
    zero3_gather: str = option(
        "auto",
        "ZeRO-3: gather the full model once for scoring, or every layer on each forward; "
        "auto gathers once when the model fits in a quarter of free memory",
        choices=list(GATHER),
    )
    overwrite: bool = option(False, "replace existing output files")

    def __post_init__(self):
        object.__setattr__(self, "batch_size", _batch_size(self.batch_size))
        self.thresholds()  # raises InputError naming the setting


def _batch_size(value: int | str) -> int | str:
    """``--batch_size``: a positive integer, or ``auto``; InputError (argparse's wording) otherwise."""
    if value == AUTO:
        return AUTO
    try:
        size = int(value) if not isinstance(value, bool | float) else 0
    except ValueError:
        size = 0
    if size < 1:
        raise InputError(f"argument --batch_size: expected a positive integer or 'auto', got {str(value)!r}")
    return size


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print_help(ScoreConfig, PROG, __doc__)
        return 0
    return run(parse_config(ScoreConfig, argv, prog=PROG))


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.stem
    return out.with_name(f"{stem}.summary.json")


def run(config: ScoreConfig) -> int:
    # The process entry (cli.main) owns the process group and the failure path.
    # Everything that can be wrong with the input is found here, before any weights load.
    model_dir = resolve_model_dir(config.model)
    inputs = (config.data, model_dir, config.adapter)
    check_output(config.out, option=param("out"), overwrite=config.overwrite, inputs=inputs)  # first: "." has no name
    check_output(summary_path(config.out), option=param("out"), overwrite=config.overwrite, inputs=inputs)
    ds_config = load_ds_config(config.deepspeed) if config.deepspeed else None
    if config.adapter is not None:
        check_adapter_dir(config.adapter)
    if config.max_length is not None and config.max_length < min_length(config.el_n, config.extract_k):
        raise InputError(
            f"--max_length {config.max_length} is shorter than el_n/extract_k need "
            f"({min_length(config.el_n, config.extract_k)} tokens)"
        )
    thresholds = config.thresholds()
    model_config = load_config(model_dir)
    vocab_size = model_config.vocab_size
    rows = read_rows(config.data)
    tokenizer = load_tokenizer(model_dir) if needs_tokenizer(rows) else None
    data = to_sequence_set(
        rows,
        tokenizer=tokenizer,
        text_field=config.text_field,
        id_field=config.id_field,
        max_length=config.max_length,
        vocab_size=vocab_size,
        **prompt_options(config),
    )
    check_context(data, context_limit(model_config))
    validate_request(
        data.sequences,
        config.el_n,
        config.extract_k,
        vocab_size,
        lambda i: f"{param('data')} row {data.row(i)}",
        prompt_lengths=data.prompt_lengths,
    )

    model = load_for_inference(model_dir, DTYPES[config.dtype], ds_config, adapter=config.adapter)
    scores = score_sequences(
        model,
        data.sequences,
        el_n=config.el_n,
        extract_k=config.extract_k,
        batch_size=config.batch_size,
        method=config.method,
        progress=True,
        gather_params=GATHER[config.zero3_gather],
        prompt_lengths=data.prompt_lengths,
    )
    if D.is_main():
        write_scores(config.out, data.ids, scores)
        summary = summarize_scores(scores, thresholds)
        write_json(summary_path(config.out), summary)
        print("\n".join(summary_lines(summary)))
        print(f"wrote {config.out} and {summary_path(config.out)}")
    return 0


def write_scores(path, ids, scores) -> None:
    write_jsonl(path, ({"id": row_id, **row} for row_id, row in zip(ids, scores)))
