"""Reading sets of sequences (JSONL, CSV, Parquet) into ids and token-id lists, validated.

A row with ``input_ids`` is used as-is; otherwise its text field is tokenized with the model's
tokenizer. Every problem is reported as one line naming the file, field and row, before any
model is loaded. Raw text never leaves this module except as token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IDS_FIELD = "input_ids"


@dataclass
class SequenceSet:
    """Row ids (the id field, or the row index) and their token ids, in file order."""

    ids: list[Any]
    sequences: list[list[int]]

    def __len__(self) -> int:
        return len(self.sequences)


def read_rows(path: str | Path, option: str = "--data") -> list[dict]:
    """All rows of a JSONL/CSV/Parquet file, through ``datasets``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option}: no such file {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{option}: {path} has an unknown extension (use {', '.join(FORMATS)})")
    import datasets

    datasets.disable_progress_bars()
    # datasets logs its own copy of a parse error; ours is the one line the user needs.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # datasets raises many types for unreadable files
        cause = _root_cause(err)
        if "corresponds to no data" in cause:  # a header-only CSV or an empty file
            raise InputError(f"{option}: {path} holds no rows") from None
        raise InputError(f"{option}: cannot read {path}: {cause}") from None
    return table.to_list()


def _root_cause(err: BaseException) -> str:
    """The innermost error's first line: datasets wraps the parser's useful message."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _as_token_ids(value, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(f"{where}: {IDS_FIELD} must be a list of integers")
    return list(value)


def to_sequence_set(
    rows: list[dict],
    *,
    tokenizer=None,
    text_field: str = "text",
    id_field: str = "id",
    max_length: int | None = None,
    vocab_size: int | None = None,
    option: str = "--data",
) -> SequenceSet:
    """Token ids and ids of ``rows``; checks ids are unique and token ids inside the vocabulary."""
    if not rows:
        raise InputError(f"{option}: the file holds no rows")
    has_ids = any(row.get(IDS_FIELD) is not None for row in rows)
    has_id_field = id_field in rows[0]
    ids, sequences, seen = [], [], {}
    for i, row in enumerate(rows):
        where = f"{option} row {i}"
        if has_id_field:
            row_id = row.get(id_field)
            if row_id is None:
                raise InputError(f"{where}: field '{id_field}' is missing")
            if row_id in seen:
                raise InputError(f"{where}: duplicate id {row_id!r} (first at row {seen[row_id]})")
            seen[row_id] = i
        else:
            row_id = i
        if has_ids and row.get(IDS_FIELD) is not None:
            tokens = _as_token_ids(row[IDS_FIELD], where)
        else:
            text = row.get(text_field)
            if not isinstance(text, str):
                raise InputError(f"{where}: field '{text_field}' is missing (and no {IDS_FIELD})")
            if tokenizer is None:
                raise InputError(f"{where}: has text but the model has no tokenizer; give {IDS_FIELD}")
            tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_length:
            tokens = tokens[:max_length]
        if vocab_size is not None:
            bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InputError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        ids.append(row_id)
        sequences.append(tokens)
    return SequenceSet(ids, sequences)


def needs_tokenizer(rows: list[dict]) -> bool:
    return any(row.get(IDS_FIELD) is None for row in rows)


def load_sequence_set(path: str | Path, option: str = "--data", **options) -> SequenceSet:
    """``read_rows`` then ``to_sequence_set`` (same keyword options)."""
    return to_sequence_set(read_rows(path, option), option=option, **options)
