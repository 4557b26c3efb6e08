"""Reading sets of sequences (JSONL, CSV, Parquet) into ids and token-id lists, validated.

A row with ``input_ids`` is used as-is; otherwise its text field is tokenized with the model's
tokenizer. A row may carry a prompt (its prompt field as text, or ``prompt_ids`` beside
``input_ids``, or under ``chat_template`` a ``messages`` list rendered by the tokenizer's own chat
template): its tokens come first and condition the response, which alone is scored and trained
on (``SequenceSet.prompt_lengths``). Every problem is reported as one line naming the file, field and row, before any
model is loaded. Raw text never leaves this module except as token ids.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, bare, param

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IDS_FIELD = "input_ids"
PROMPT_IDS_FIELD = "prompt_ids"  # beside input_ids (the response): the prompt's token ids
DEFAULT_PROMPT_FIELD = "prompt"
MESSAGES_FIELD = "messages"  # under chat_template: a list of {role, content}
SCORE_TURNS = ("last", "all")
DEFAULT_ID_FIELD = "id"  # rows without it are numbered; any other id_field must exist


@dataclass
class SequenceSet:
    """Row ids (the id field, or the row index) and their token ids, in file order.

    ``prompt_lengths``: None when no row has a prompt; else one int per sequence, the number of
    leading prompt tokens of ``sequences[i]`` (0: a row scored whole). The prompt conditions the
    rest but is never scored, trained on or counted.

    ``rows``: None when sequence i is the file's row i; else the file row of each sequence
    (``score_turns="all"`` makes one sequence per assistant turn of a row). Errors name the file
    row (``row``), which is what the user can find and fix."""

    ids: list[Any]
    sequences: list[list[int]]
    has_id_field: bool = False  # ids come from the id field (else they are row indices)
    prompt_lengths: list[int] | None = None
    rows: list[int] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def row(self, i: int) -> int:
        """The file row (0-based, as every error names rows) that sequence ``i`` comes from."""
        return i if self.rows is None else self.rows[i]

    def prompts(self) -> list[int]:
        """Each sequence's prompt length (0 for all when the set has no prompts)."""
        return list(self.prompt_lengths) if self.prompt_lengths is not None else [0] * len(self.sequences)


def read_rows(path: str | Path, option: str = param("data")) -> list[dict]:
    """All rows of a JSONL (or JSON array), CSV or Parquet file, as dicts in file order.

    Read directly (the standard library, and pyarrow for Parquet) rather than through
    ``datasets``, which would leave lock and cache files behind in the user's cache for every
    read. Raises InputError naming the input as ``option`` (a parameter, ``param(name)``, or plain
    words), the file and the line or row: missing or unreadable file, unknown extension, invalid
    JSON, a row that is not an object, no rows at all."""
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


def _as_token_ids(value, where: str, field: str = IDS_FIELD) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(f"{where}: {field} must be a list of integers")
    return list(value)


def _prompt_text(row: dict, where: str, field: str) -> str:
    """The row's prompt: a string (empty allowed: no prompt tokens), else InputError."""
    value = row[field]
    if not isinstance(value, str):
        raise InputError(f"{where}: prompt field '{field}' is {_kind(value)}, not a string ({param('prompt_field')})")
    _check_unicode(value, where, field)
    return value


def _rendered_ids(tokenizer, messages: list[dict], generation: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


def chat_sequences(messages, where: str, tokenizer, score_turns: str = "last") -> list[tuple[list[int], int, int]]:
    """``messages`` (a list of ``{role, content}``, content a string) rendered by the tokenizer's own
    chat template, as ``(tokens, prompt_length, turn)`` per scored assistant turn (``score_turns``:
    the last one, or all, each conditioned on the whole conversation before it). The prompt is
    everything before the turn's content, the generation prompt (``add_generation_prompt``)
    included; the response is the turn as the template renders it (its end-of-turn tokens too);
    messages after the scored turn are dropped. InputError (one line): not such a list, no
    assistant turn, or a template that does not render a turn as a continuation of what came before."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise InputError(f"{where}: field '{MESSAGES_FIELD}' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {k} has content {_kind(m.get('content'))}, not a string")
        _check_unicode(m["content"], where, f"{MESSAGES_FIELD}[{k}].content")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InputError(f"{where}: '{MESSAGES_FIELD}' has no assistant turn, so nothing to score or unlearn")
    out = []
    for turn in turns if score_turns == "all" else turns[-1:]:
        prompt = _rendered_ids(tokenizer, messages[:turn], generation=True)
        tokens = _rendered_ids(tokenizer, messages[: turn + 1], generation=False)
        if tokens[: len(prompt)] != prompt:
            raise InputError(
                f"{where}: the chat template renders assistant turn {turn} so that it does not extend the "
                "conversation before it (its generation prompt differs): the prompt cannot be masked"
            )
        out.append((tokens, len(prompt), turn))
    return out


def to_sequence_set(
    rows: list[dict],
    *,
    tokenizer=None,
    text_field: str = "text",
    id_field: str = DEFAULT_ID_FIELD,
    max_length: int | None = None,
    vocab_size: int | None = None,
    option: str = param("data"),
    prompt_field: str = DEFAULT_PROMPT_FIELD,
    mixed_prompts: bool = False,
    chat_template: bool = False,
    score_turns: str = "last",
) -> SequenceSet:
    """Token ids and ids of ``rows``; checks ids are unique and token ids inside the vocabulary.

    Prompts: a text row with ``prompt_field`` (a string) is its prompt's tokens then its text's
    (each tokenized alone, without special tokens; put any separator in the prompt); an
    ``input_ids`` row with ``prompt_ids`` is those then its ``input_ids``; under ``chat_template``
    a row with ``messages`` is rendered by the tokenizer's chat template (``chat_sequences``; with
    ``score_turns="all"`` one sequence per assistant turn, id ``"{id}/{turn}"``). ``max_length``
    cuts the whole sequence. Raises InputError (one line, naming the row): a prompt that is not a
    string, a prompt leaving no response token, rows with and without a prompt in one file unless
    ``mixed_prompts``, ``chat_template`` with a tokenizer that has none."""
    if not rows:
        raise InputError(f"{option}: the file holds no rows")
    if score_turns not in SCORE_TURNS:
        raise InputError(f"{param('score_turns')} must be one of {', '.join(SCORE_TURNS)}, got {score_turns!r}")
    if chat_template and any(MESSAGES_FIELD in row for row in rows):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "the model's tokenizer has no chat template (give prompt/response rows instead)", field="chat_template"
            )
    has_ids = any(row.get(IDS_FIELD) is not None for row in rows)
    # Ids come from the id field when any row has it, and then every row must; else row indices,
    # but only for the default field name: a field the user named must exist.
    first_with_id = next((i for i, row in enumerate(rows) if id_field in row), None)
    has_id_field = first_with_id is not None
    if not has_id_field and id_field != DEFAULT_ID_FIELD:
        raise InputError(
            f"{option}: no row has the id field '{id_field}' ({param('id_field')}; without it rows are numbered)"
        )
    ids, sequences, prompts, file_rows, seen = [], [], [], [], {}
    with_prompt = without_prompt = None  # the first row of each kind
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
        prompt: list[int] | None = None
        parts = None  # chat rows: (tokens, prompt length, turn) per scored turn
        if chat_template and MESSAGES_FIELD in row:
            parts = chat_sequences(row[MESSAGES_FIELD], where, tokenizer, score_turns)
        elif has_ids and row.get(IDS_FIELD) is not None:
            tokens = _as_token_ids(row[IDS_FIELD], where)
            if row.get(PROMPT_IDS_FIELD) is not None:
                prompt = _as_token_ids(row[PROMPT_IDS_FIELD], where, PROMPT_IDS_FIELD)
        else:
            text = row.get(text_field)
            if text_field not in row:
                fields = ", ".join(repr(k) for k in list(row)[:8]) or "none"
                hint = f" (chat rows: pass {param('chat_template')})" if MESSAGES_FIELD in row else ""
                raise InputError(
                    f"{where}: field '{text_field}' is missing (and no {IDS_FIELD}); the row has {fields}: "
                    f"name the text with {param('text_field')}{hint}"
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
            if prompt_field in row:
                prompt = list(tokenizer(_prompt_text(row, where, prompt_field), add_special_tokens=False)["input_ids"])
            tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if parts is None:
            parts = [(tokens, 0, None)] if prompt is None else [(prompt + tokens, len(prompt), None)]
        kind = prompt is not None or chat_template and MESSAGES_FIELD in row
        if kind and with_prompt is None:
            with_prompt = i
        if not kind and without_prompt is None:
            without_prompt = i
        if with_prompt is not None and without_prompt is not None and not mixed_prompts:
            other = without_prompt if kind else with_prompt
            what = f"a prompt but row {other} has none" if kind else f"no prompt but row {other} has one"
            raise InputError(
                f"{where}: has {what} ('{prompt_field}', {PROMPT_IDS_FIELD} or {MESSAGES_FIELD}); "
                f"pass {param('mixed_prompts')} to score rows without one whole"
            )
        for tokens, prompt_length, turn in parts:
            if max_length:
                tokens = tokens[:max_length]
            if prompt_length and len(tokens) <= prompt_length:
                cut = (
                    f" within {param('max_length')} {max_length}" if max_length and max_length <= prompt_length else ""
                )
                raise InputError(f"{where}: its prompt of {prompt_length} tokens leaves no response token{cut}")
            if vocab_size is not None:
                bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
                if bad is not None:
                    raise InputError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
            ids.append(row_id if turn is None or score_turns == "last" else f"{row_id}/{turn}")
            sequences.append(tokens)
            prompts.append(prompt_length)
            file_rows.append(i)
    has_prompts = with_prompt is not None
    rows_differ = file_rows != list(range(len(file_rows)))
    return SequenceSet(
        ids, sequences, has_id_field, prompts if has_prompts else None, file_rows if rows_differ else None
    )


PROMPT_HELP = {
    "prompt_field": "field holding a row's prompt: its tokens condition the response but are never scored, "
    "trained on or counted (input_ids rows: prompt_ids)",
    "mixed_prompts": "allow a file mixing rows with and without a prompt (those without are scored whole)",
    "chat_template": "render rows with 'messages' (a list of {role, content}) by the tokenizer's chat template; "
    "the assistant turn is the response, everything before it (generation prompt included) the prompt",
    "score_turns": "with --chat_template: score the last assistant turn, or every one (a sequence each, id ID/TURN)",
}


def prompt_options(args) -> dict:
    """The prompt settings of ``args`` (parsed flags or a config) as ``to_sequence_set`` keywords."""
    names = ("prompt_field", "mixed_prompts", "chat_template", "score_turns")
    return {name: getattr(args, name) for name in names}


def needs_tokenizer(rows: list[dict]) -> bool:
    return any(row.get(IDS_FIELD) is None for row in rows)


def load_sequence_set(path: str | Path, option: str = param("data"), **options) -> SequenceSet:
    """``read_rows`` then ``to_sequence_set`` (same keyword options)."""
    return to_sequence_set(read_rows(path, option), option=option, **options)


def check_context(data: SequenceSet, limit: int | None, option: str = param("data")) -> None:
    """Every sequence fits the model's context (``max_position_embeddings`` tokens); raises
    InputError naming the first row that does not (``max_length`` cuts rows on request), or whose
    prompt alone leaves no response token inside it."""
    if not limit:
        return
    for i, (seq, prompt) in enumerate(zip(data.sequences, data.prompts())):
        if prompt >= limit:
            raise InputError(
                f"{option} row {data.row(i)}: its prompt of {prompt} tokens leaves no response token inside the "
                f"model's context of {limit} (shorten the prompt)"
            )
        if len(seq) > limit:
            raise InputError(
                f"{option} row {data.row(i)}: {len(seq)} tokens, more than the model's context of {limit} "
                f"(pass {param('max_length')} {limit} to cut rows)"
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
    shown = ", ".join(
        f"row {data.row(i)} ({data.ids[i]!r}) repeats row {data.row(j)} ({data.ids[j]!r})" for j, i in pairs[:3]
    )
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    return (
        f"note: {option}: {len(pairs)} row(s) hold the same tokens as an earlier row: {shown}{more}; "
        "each copy counts as its own sequence (deduplicate the file to count it once)"
    )


def duplicates_notes(sets: Mapping[str, SequenceSet | None], shown: Callable[[str], str] = bare) -> list[str]:
    """``duplicates_note`` of every set given (by parameter name) that has repeats, each set named
    by ``shown(name)`` (``errors.flag`` in a command's line)."""
    notes = (duplicates_note(data, shown(name)) for name, data in sets.items() if data is not None)
    return [note for note in notes if note]


def check_disjoint(first: SequenceSet, second: SequenceSet, names: tuple[str, str]) -> None:
    """Two sets that must share nothing (forget vs holdout): no common id (when both have id
    fields) and no identical token sequence; raises InputError naming the row of the set by its
    parameter name (``names``: first, second)."""
    a, b = (param(name) for name in names)
    seen = {tuple(seq): i for i, seq in enumerate(first.sequences)}
    for j, seq in enumerate(second.sequences):
        if tuple(seq) in seen:
            raise InputError(
                f"{b} row {second.row(j)}: the same tokens as {a} row {first.row(seen[tuple(seq)])}; "
                "the sets must not overlap"
            )
    if first.has_id_field and second.has_id_field:
        ids = {row_id: i for i, row_id in enumerate(first.ids)}
        for j, row_id in enumerate(second.ids):
            if row_id in ids:
                raise InputError(f"{b} row {second.row(j)}: id {row_id!r} is also {a} row {first.row(ids[row_id])}")
