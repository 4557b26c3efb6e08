"""Reading sets of sequences (JSONL, CSV, Parquet) into ids and token-id lists, validated.

A row with ``input_ids`` is used as-is; otherwise its text field is tokenized with the model's
tokenizer. Every problem is reported as one line naming the file, field and row, before any
model is loaded. Raw text never leaves this module except as token ids.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IDS_FIELD = "input_ids"
DEFAULT_ID_FIELD = "id"  # rows without it are numbered; any other --id_field must exist


@dataclass
class SequenceSet:
    """Row ids (the id field, or the row index) and their token ids, in file order."""

    ids: list[Any]
    sequences: list[list[int]]
    has_id_field: bool = False  # ids come from the id field (else they are row indices)

    def __len__(self) -> int:
        return len(self.sequences)


def read_rows(path: str | Path, option: str = "--data") -> list[dict]:
    """All rows of a JSONL (or JSON array), CSV or Parquet file, as dicts in file order.

    Read directly (the standard library, and pyarrow for Parquet) rather than through
    ``datasets``, which would leave lock and cache files behind in the user's cache for every
    read. Raises InputError naming the file and the line or row: missing or unreadable file,
    unknown extension, invalid JSON, a row that is not an object, no rows at all."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option}: {path} is a directory, not a data file (give a {', '.join(FORMATS)} file)")
    if not path.exists():
        raise InputError(f"{option}: no such file {path}")
    if not path.is_file():
        raise InputError(f"{option}: {path} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{option}: {path} has an unknown extension (use {', '.join(FORMATS)})")
    try:
        if suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            text = path.read_text(encoding="utf-8")
            rows = _read_csv(text, path, option) if suffix == ".csv" else _read_json(text, path, option, suffix)
    except UnicodeDecodeError as err:
        raise InputError(f"{option}: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{option}: cannot read {path}: {err.strerror or err}") from None
    if not rows:
        raise InputError(f"{option}: {path} holds no rows")
    return rows


def _read_json(text: str, path: Path, option: str, suffix: str) -> list[dict]:
    # A .json file may hold one array of objects; a .jsonl file is always one object per line (a
    # line that is an array is then a row of the wrong kind, not the start of an array).
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{option}: {path} line {err.lineno}: invalid JSON ({err.msg})") from None
        lines = [None] * len(rows)
    else:  # JSON Lines: one object per non-empty line
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{option}: {path} line {number} (row {len(rows)}): invalid JSON ({err.msg})"
                ) from None
            lines.append(number)
    for i, (row, number) in enumerate(zip(rows, lines)):
        if not isinstance(row, dict):
            where = f"line {number} (row {i})" if number else f"row {i}"
            raise InputError(
                f"{option}: {path} {where}: expected a JSON object such as"
                f' {{"{IDS_FIELD}": [...]}} or {{"text": "..."}}, got {type(row).__name__}'
            )
    return rows


def _read_csv(text: str, path: Path, option: str) -> list[dict]:
    rows = []
    # strict: an unterminated quote is an error, not one row that swallows the rest of the file.
    reader, parsed = csv.DictReader(io.StringIO(text), strict=True), []
    try:
        parsed.extend(reader)
    except csv.Error as e:  # names the row it was reading (an unterminated quote: where it opened)
        raise InputError(f"{option}: {path} row {len(parsed)}: malformed CSV ({e})") from None
    for i, row in enumerate(parsed):
        if None in row:  # more fields than the header names
            raise InputError(f"{option}: {path} row {i}: more fields than the header has")
        ids = row.get(IDS_FIELD)
        if isinstance(ids, str) and ids.strip():  # token ids stored as a JSON list in a cell
            try:
                row[IDS_FIELD] = json.loads(ids)
            except json.JSONDecodeError:
                raise InputError(f"{option}: {path} row {i}: {IDS_FIELD} is not a JSON list") from None
        elif ids is not None and not ids.strip():
            row[IDS_FIELD] = None
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files
        raise InputError(f"cannot read {path} as Parquet: {str(err).splitlines()[0]}") from None


def _kind(value) -> str:
    """The type of a field's value in words (JSON's names; integer and float for numbers), never
    the value itself: rows may be private."""
    if value is None:
        return "null"
    for types, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, types):
            return name
    return f"of type {type(value).__name__}"


def _check_unicode(value: str, where: str, field: str) -> None:
    """InputError when ``value`` cannot be encoded as UTF-8 (an unpaired surrogate, which valid
    JSON can carry as an escape): the tokenizer and the output files would choke on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"{where}: field '{field}' is not valid Unicode (an unpaired surrogate at character {err.start})"
        ) from None


def _row_id(row: dict, where: str, id_field: str):
    """The id of a row that has the id field: a string or an integer (not a boolean, float,
    array, object or null)."""
    value = row[id_field]
    if value is None:
        raise InputError(f"{where}: field '{id_field}' is missing (it is null; an id must be a string or an integer)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: field '{id_field}' must be a string or an integer, not {_kind(value)}")
    if isinstance(value, str):
        _check_unicode(value, where, id_field)
    return value


def _as_token_ids(value, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(f"{where}: {IDS_FIELD} must be a list of integers")
    return list(value)


def to_sequence_set(
    rows: list[dict],
    *,
    tokenizer=None,
    text_field: str = "text",
    id_field: str = DEFAULT_ID_FIELD,
    max_length: int | None = None,
    vocab_size: int | None = None,
    option: str = "--data",
) -> SequenceSet:
    """Token ids and ids of ``rows``; checks ids are unique and token ids inside the vocabulary."""
    if not rows:
        raise InputError(f"{option}: the file holds no rows")
    has_ids = any(row.get(IDS_FIELD) is not None for row in rows)
    # Ids come from the id field when any row has it, and then every row must; else row indices,
    # but only for the default field name: a field the user named must exist.
    first_with_id = next((i for i, row in enumerate(rows) if id_field in row), None)
    has_id_field = first_with_id is not None
    if not has_id_field and id_field != DEFAULT_ID_FIELD:
        raise InputError(f"{option}: no row has the id field '{id_field}' (--id_field; without it rows are numbered)")
    ids, sequences, seen = [], [], {}
    for i, row in enumerate(rows):
        where = f"{option} row {i}"
        if has_id_field:
            if id_field not in row:
                raise InputError(
                    f"{where}: field '{id_field}' is missing (row {first_with_id} has it, so every row needs one)"
                )
            row_id = _row_id(row, where, id_field)
            if row_id in seen:
                raise InputError(f"{where}: duplicate id {row_id!r} (first at row {seen[row_id]})")
            seen[row_id] = i
        else:
            row_id = i
        if has_ids and row.get(IDS_FIELD) is not None:
            tokens = _as_token_ids(row[IDS_FIELD], where)
        else:
            text = row.get(text_field)
            if text_field not in row:
                fields = ", ".join(repr(k) for k in list(row)[:8]) or "none"
                raise InputError(
                    f"{where}: field '{text_field}' is missing (and no {IDS_FIELD}); the row has {fields}: "
                    "name the text with --text_field"
                )
            if text is None:
                raise InputError(
                    f"{where}: field '{text_field}' is missing (it is null, not a string; and no {IDS_FIELD})"
                )
            if not isinstance(text, str):
                raise InputError(f"{where}: field '{text_field}' is {_kind(text)}, not a string (and no {IDS_FIELD})")
            _check_unicode(text, where, text_field)
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
    return SequenceSet(ids, sequences, has_id_field)


def needs_tokenizer(rows: list[dict]) -> bool:
    return any(row.get(IDS_FIELD) is None for row in rows)


def load_sequence_set(path: str | Path, option: str = "--data", **options) -> SequenceSet:
    """``read_rows`` then ``to_sequence_set`` (same keyword options)."""
    return to_sequence_set(read_rows(path, option), option=option, **options)


def check_context(data: SequenceSet, limit: int | None, option: str = "--data") -> None:
    """Every sequence fits the model's context (``max_position_embeddings`` tokens); raises
    InputError naming the first row that does not (``--max_length`` cuts rows on request)."""
    if not limit:
        return
    for i, seq in enumerate(data.sequences):
        if len(seq) > limit:
            raise InputError(
                f"{option} row {i}: {len(seq)} tokens, more than the model's context of {limit} "
                f"(pass --max_length {limit} to cut rows)"
            )


def duplicate_rows(data: SequenceSet) -> list[tuple[int, int]]:
    """``(first, later)`` row indices of every row whose token ids equal an earlier row's (under
    another id: ids are unique by construction), in file order. Not an error: a duplicate in a
    forget set is trained and scored as its own sequence, which the caller tells the user."""
    first: dict[tuple[int, ...], int] = {}
    pairs = []
    for i, seq in enumerate(data.sequences):
        j = first.setdefault(tuple(seq), i)
        if j != i:
            pairs.append((j, i))
    return pairs


def duplicates_note(data: SequenceSet, option: str) -> str | None:
    """One line naming the repeated rows of ``data`` by row and id (never their text), or None."""
    pairs = duplicate_rows(data)
    if not pairs:
        return None
    shown = ", ".join(f"row {i} ({data.ids[i]!r}) repeats row {j} ({data.ids[j]!r})" for j, i in pairs[:3])
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    return (
        f"note: {option}: {len(pairs)} row(s) hold the same tokens as an earlier row: {shown}{more}; "
        "each copy counts as its own sequence (deduplicate the file to count it once)"
    )


def duplicates_notes(sets: Mapping[str, SequenceSet | None]) -> list[str]:
    """``duplicates_note`` of every set given (by option name without ``--``) that has repeats."""
    notes = (duplicates_note(data, f"--{name}") for name, data in sets.items() if data is not None)
    return [note for note in notes if note]


def check_disjoint(first: SequenceSet, second: SequenceSet, names: tuple[str, str]) -> None:
    """Two sets that must share nothing (forget vs holdout): no common id (when both have id
    fields) and no identical token sequence; raises InputError naming the row."""
    a, b = names
    seen = {tuple(seq): i for i, seq in enumerate(first.sequences)}
    for j, seq in enumerate(second.sequences):
        if tuple(seq) in seen:
            raise InputError(
                f"--{b} row {j}: the same tokens as --{a} row {seen[tuple(seq)]}; the sets must not overlap"
            )
    if first.has_id_field and second.has_id_field:
        ids = {row_id: i for i, row_id in enumerate(first.ids)}
        for j, row_id in enumerate(second.ids):
            if row_id in ids:
                raise InputError(f"--{b} row {j}: id {row_id!r} is also --{a} row {ids[row_id]}")
