"""``--score_turns all``: one sequence per assistant turn, so a set's sequence index is no longer
its file row. Errors must name the row of the file the user can open (and the turn), not the
sequence index.

Checks made while reading rows (``to_sequence_set``) name the file row; checks made afterwards on
the ``SequenceSet`` (``check_context``, ``check_disjoint``) name it through ``SequenceSet.row``.
"""

import pytest

from ds_unlearn.core.data import SequenceSet, check_context, check_disjoint, to_sequence_set
from ds_unlearn.core.errors import InputError

from .test_prompts import CHAT


@pytest.fixture(scope="module")
def tokenizer():
    """test_prompts.py's word-level tokenizer ("t5 t9" -> [5, 9]) and chat template: user turns
    "t1 ...", assistant turns "t2 ... t3", generation prompt "t2"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    out.chat_template = CHAT
    return out


def _user(content):
    return {"role": "user", "content": content}


def _assistant(content):
    return {"role": "assistant", "content": content}


# Row 0 has two assistant turns (sequences 0 and 1), row 1 one (sequence 2) with a long prompt.
ROWS = [
    {"id": "a", "messages": [_user("t4"), _assistant("t5 t6"), _user("t7"), _assistant("t8")]},
    {"id": "b", "messages": [_user(" ".join(["t9"] * 10)), _assistant("t10")]},
]


def _all_turns(tokenizer, rows=ROWS, **options) -> SequenceSet:
    return to_sequence_set(rows, tokenizer=tokenizer, chat_template=True, score_turns="all", **options)


def test_all_turns_are_one_sequence_each(tokenizer):
    data = _all_turns(tokenizer)
    assert data.ids == ["a/1", "a/3", "b/1"]
    assert [len(s) for s in data.sequences] == [6, 11, 14] and data.prompts() == [3, 9, 12]


def test_errors_found_while_reading_name_the_file_row(tokenizer):
    # Row 0's second turn (prompt 9 tokens) is cut away by max_length 9: row 0, not sequence 1.
    with pytest.raises(InputError, match=r"\bdata row 0: its prompt of 9 tokens leaves no response token"):
        _all_turns(tokenizer, max_length=9)
    no_reply = [ROWS[0], {"id": "c", "messages": [_user("t4")]}]
    with pytest.raises(InputError, match=r"\bdata row 1: 'messages' has no assistant turn"):
        _all_turns(tokenizer, no_reply)


def test_a_prompt_filling_the_context_names_the_file_row(tokenizer):
    with pytest.raises(InputError) as caught:
        check_context(_all_turns(tokenizer), 12, "--forget")
    assert str(caught.value).startswith("--forget row 1"), str(caught.value)


def test_an_overlap_names_the_file_rows(tokenizer):
    # The forget row is the holdout row's conversation, scored on its last turn: the holdout's sequence 1.
    forget = to_sequence_set([{"id": "f", "messages": ROWS[0]["messages"]}], tokenizer=tokenizer, chat_template=True)
    holdout = _all_turns(tokenizer, [ROWS[0]])
    with pytest.raises(InputError) as caught:
        check_disjoint(forget, holdout, ("forget", "holdout"))
    assert "holdout row 0:" in str(caught.value), str(caught.value)


def test_the_audit_set_checks_name_the_file_rows(tokenizer):
    # The audit's own checks (too few response tokens, a shared sequence) take the sets' file rows.
    from ds_unlearn.core.audit import AuditSettings, check_sets

    data = _all_turns(tokenizer)  # sequences a/1, a/3, b/1 from file rows 0, 0, 1
    forget = to_sequence_set([{"id": "f", "messages": ROWS[1]["messages"]}], tokenizer=tokenizer, chat_template=True)
    settings = AuditSettings(prefix_length=1, suffix_length=None, el_n=(1,), extract_k=(1,), bootstrap=0)
    with pytest.raises(InputError, match=r"^holdout row 1: same text as forget row 0"):
        check_sets(
            forget.sequences,
            data.sequences,
            prompts=(forget.prompt_lengths, data.prompt_lengths),
            settings=settings,
            rows=(forget.rows, data.rows),
        )
    # Suffix 3: a/1 (3 response tokens) passes, a/3 (2) does not: file row 0, sequence 1.
    strict = AuditSettings(prefix_length=1, suffix_length=3, el_n=(1,), extract_k=(1,), bootstrap=0)
    long = to_sequence_set(
        [{"id": "g", "messages": [_user("t4"), _assistant("t11 t12 t13 t14 t15")]}],
        tokenizer=tokenizer,
        chat_template=True,
    )
    with pytest.raises(InputError, match=r"^holdout row 0: its prompt of 9 tokens leaves 2 response tokens"):
        check_sets(
            long.sequences,
            data.sequences,
            prompts=(long.prompt_lengths, data.prompt_lengths),
            settings=strict,
            rows=(long.rows, data.rows),
        )
