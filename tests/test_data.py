"""Reading and validating data rows (core.data): every problem is one InputError line naming the
row and field, never the row's text."""

import json

import pytest

from ds_unlearn.core.data import duplicate_rows, duplicates_note, read_rows, to_sequence_set
from ds_unlearn.core.errors import InputError

from .conftest import VOCAB

SECRET = "t5 t9 t12 private words"


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t5 t9" -> [5, 9]), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def error(rows, tokenizer, **options) -> str:
    with pytest.raises(InputError) as caught:
        to_sequence_set(rows, tokenizer=tokenizer, vocab_size=VOCAB, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_good_rows_with_and_without_ids(tokenizer):
    data = to_sequence_set([{"id": "a", "text": "t1 t2"}, {"id": 7, "text": "t3"}], tokenizer=tokenizer)
    assert data.ids == ["a", 7] and data.sequences == [[1, 2], [3]] and data.has_id_field
    data = to_sequence_set([{"text": "t1 t2"}, {"text": "t3"}], tokenizer=tokenizer)
    assert data.ids == [0, 1] and not data.has_id_field


@pytest.mark.parametrize(
    ("value", "kind"),
    [([1], "an array"), ({"k": SECRET}, "an object"), (True, "a boolean"), (1.5, "a float")],
)
def test_id_must_be_a_string_or_an_integer(tokenizer, value, kind):
    rows = [{"id": "a", "text": "t1"}, {"id": value, "text": SECRET}]
    message = error(rows, tokenizer)
    assert message.startswith("data row 1: field 'id' must be a string or an integer")
    assert kind in message and SECRET not in message and "private" not in message


def test_null_id_is_named(tokenizer):
    message = error([{"id": "a", "text": "t1"}, {"id": None, "text": SECRET}], tokenizer)
    assert message.startswith("data row 1: field 'id' is missing") and "null" in message
    assert SECRET not in message


def test_text_with_an_unpaired_surrogate(tokenizer, tmp_path):
    path = tmp_path / "forget.jsonl"
    secret = SECRET + "\ud800 tail"
    path.write_text(json.dumps({"id": "a", "text": "t1"}) + "\n" + json.dumps({"id": "b", "text": secret}) + "\n")
    rows = read_rows(path, "--forget")
    message = error(rows, tokenizer, option="--forget")
    assert message == (
        f"--forget row 1: field 'text' is not valid Unicode (an unpaired surrogate at character {len(SECRET)})"
    )
    assert "private" not in message


def test_id_with_an_unpaired_surrogate(tokenizer):
    message = error([{"id": "x\udc00y", "text": "t1"}], tokenizer)
    assert message.startswith("data row 0: field 'id' is not valid Unicode")


def test_id_field_on_later_rows_only_must_be_on_every_row(tokenizer):
    rows = [{"text": "t1"}, {"id": "b", "text": "t2"}, {"id": "c", "text": "t3"}]
    message = error(rows, tokenizer)
    assert message.startswith("data row 0: field 'id' is missing") and "row 1 has it" in message
    rows = [{"id": "a", "text": "t1"}, {"text": "t2"}]
    assert error(rows, tokenizer).startswith("data row 1: field 'id' is missing")
    custom = [{"text": "t1"}, {"text": "t2", "key": 3}]
    assert error(custom, tokenizer, id_field="key").startswith("data row 0: field 'key' is missing")


@pytest.mark.parametrize(("value", "kind"), [(12345, "an integer"), ([SECRET], "an array"), (False, "a boolean")])
def test_text_present_but_not_a_string(tokenizer, value, kind):
    message = error([{"id": "a", "text": value}], tokenizer)
    assert message == f"data row 0: field 'text' is {kind}, not a string (and no input_ids)"


def test_null_text_says_null(tokenizer):
    message = error([{"id": "a", "text": None}], tokenizer)
    assert message.startswith("data row 0: field 'text' is missing") and "null, not a string" in message


def test_absent_text_is_still_missing(tokenizer):
    assert error([{"id": "a", "body": "x"}], tokenizer) == (
        "data row 0: field 'text' is missing (and no input_ids); the row has 'id', 'body': name the text with "
        "text_field"
    )


def test_directory_as_data_path(tmp_path):
    with pytest.raises(InputError) as caught:
        read_rows(tmp_path, "--forget")
    message = str(caught.value)
    assert message.startswith(f"--forget: {tmp_path} is a directory") and "no such file" not in message
    with pytest.raises(InputError, match="no such file"):
        read_rows(tmp_path / "nope.jsonl")


def test_a_named_id_field_must_exist(tokenizer):
    # The default field may be absent (rows are numbered); one the user named may not.
    assert to_sequence_set([{"text": "t1"}], tokenizer=tokenizer).ids == [0]
    message = error([{"id": "a", "text": "t1"}], tokenizer, id_field="key", option="--forget")
    assert message == "--forget: no row has the id field 'key' (id_field; without it rows are numbered)"


def test_jsonl_is_always_one_object_per_line_and_json_may_be_an_array(tmp_path):
    # A .jsonl whose first line is an array is a row of the wrong kind, not a JSON array file.
    (tmp_path / "a.jsonl").write_text("[1, 2, 3]\n")
    with pytest.raises(InputError) as caught:
        read_rows(tmp_path / "a.jsonl")
    assert "line 1 (row 0): expected a JSON object such as" in str(caught.value)
    assert str(caught.value).endswith("got list")
    rows = [{"id": "a", "input_ids": [1, 2]}, {"id": "b", "input_ids": [3]}]
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "c.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON Lines named .json
    assert read_rows(tmp_path / "b.json") == rows == read_rows(tmp_path / "c.json")


def test_repeated_token_rows_are_named_by_row_and_id_never_by_text(tokenizer):
    rows = [{"id": i, "text": t} for i, t in zip("abcde", [SECRET, "t1 t2", SECRET, "t1 t2", SECRET])]
    data = to_sequence_set(rows, tokenizer=tokenizer, vocab_size=VOCAB)
    assert duplicate_rows(data) == [(0, 2), (1, 3), (0, 4)]
    note = duplicates_note(data, "--forget")
    assert note.startswith("note: --forget: 3 row(s) hold the same tokens as an earlier row: ")
    assert "row 2 ('c') repeats row 0 ('a'), row 3 ('d') repeats row 1 ('b')" in note
    assert "private" not in note and "\n" not in note
    many = to_sequence_set([{"text": "t3"}] * 5, tokenizer=tokenizer, vocab_size=VOCAB)
    assert duplicates_note(many, "--holdout").count("repeats") == 3 and " and 1 more;" in duplicates_note(many, "x")
    assert duplicates_note(to_sequence_set(rows[:2], tokenizer=tokenizer, vocab_size=VOCAB), "--forget") is None


def test_a_csv_with_an_unterminated_quote_is_refused_at_its_row(tmp_path):
    # A lenient reader would make row 1 swallow the rest of the file, text and all.
    path = tmp_path / "forget.csv"
    path.write_text(f'id,text\na,t1 t2\nb,"{SECRET}\nc,t3 t4\n')
    with pytest.raises(InputError) as caught:
        read_rows(path, "--forget")
    message = str(caught.value)
    assert message == f"--forget: {path} row 1: malformed CSV (unexpected end of data)"
    assert "private" not in message
