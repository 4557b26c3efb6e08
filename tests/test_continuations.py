"""The draft-and-verify decoder on its own: drafts cut forwards only where they can, and never
change a token."""

import numpy as np
import pytest

from ds_unlearn.core.continuations import ContinuationBatch, Request, draft_width
from ds_unlearn.core.passes import greedy_continuations, teacher_forced_pass
from ds_unlearn.core.scorer import context_limit


def _decode(model, seqs, requests, expected_run):
    tf = teacher_forced_pass(model, seqs, keep_cache=True)
    batch = ContinuationBatch(
        model, tf.tokens, tf.predictions, tf.cache, requests, np.asarray(expected_run, float), 16, context_limit(model)
    )
    while batch.has_work():
        batch.step()
    return batch


def test_drafts_of_memorized_text_cut_forwards_and_change_no_token(memorized_model, token_sets):
    # Continuing a memorized sequence from its 3rd token reproduces the rest of it; with drafts
    # (expected run 20) that takes a few forwards, without (0) one forward per token, and the
    # tokens are those of step-by-step greedy decoding either way.
    seqs = token_sets["memorized"]
    requests = [Request(seq=i, start=2, length=len(s) - 3) for i, s in enumerate(seqs)]
    expected = greedy_continuations(memorized_model, [s[:3] for s in seqs], [r.length for r in requests])
    drafted = _decode(memorized_model, seqs, requests, [20.0] * len(seqs))
    plain = _decode(memorized_model, seqs, requests, [0.0] * len(seqs))
    assert drafted.results == plain.results == expected
    assert expected == [list(s[3:]) for s in seqs]  # the model really reproduces them
    longest = max(r.length for r in requests)
    assert plain.forward_calls == longest - 1  # the first token is the teacher-forced argmax
    assert drafted.forward_calls <= longest // 4


@pytest.mark.parametrize(
    ("room", "eps", "waiting_left", "expected"),
    [
        # Every row expected to get drafts accepted, nothing waiting: draft.
        ([50, 40], [20.0, 20.0], 0, "some"),
        # A row that gets nothing accepted has the most left: it sets the forwards, so no drafts.
        ([30, 60], [20.0, 0.5], 0, 0),
        # Likewise a waiting request that will not get drafts accepted and needs longer.
        ([30, 40], [20.0, 20.0], 45, 0),
        # The drafting row has more left than any plain one: drafting shortens the decode.
        ([60, 30], [20.0, 0.0], 10, "some"),
        # Nothing expected accepted anywhere (unseen text): one token per row.
        ([60, 30], [0.5, 0.0], 0, 0),
    ],
)
def test_draft_width_drafts_only_when_it_can_cut_forwards(room, eps, waiting_left, expected):
    width = draft_width(np.array(room), np.array(eps), waiting_left, col_room=200, rows=len(room))
    if expected == "some":
        assert width >= 8
    else:
        assert width == expected


def test_draft_width_stays_inside_the_buffer_and_the_rows_needs():
    assert draft_width(np.array([50]), np.array([40.0]), 0, col_room=5, rows=1) <= 5
    assert draft_width(np.array([3]), np.array([40.0]), 0, col_room=200, rows=1) <= 3
