"""The metric math against hand-computed values (the definitions in core/memorization.py)."""

import pytest

from ds_unlearn.core.memorization import (
    continuation_starts,
    extraction_likelihood_fast,
    extraction_likelihood_reference,
    first_errors,
    is_extractable,
    longest_true_run,
    memorization_accuracy,
    ngram_overlap,
    sequence_metrics,
)
from ds_unlearn.core.verdict import Thresholds

# x = [5, 6, 7, 5, 6, 8]; the model predicts x[1], x[2] right, x[3] wrong, x[4] right, x[5] wrong.
TOKENS = [5, 6, 7, 5, 6, 8]
MATCH = [True, True, False, True, False]
# Greedy continuations from each wrong position f (of TOKENS[:f+1]):
FROM_ERRORS = {2: [5, 6, 7], 4: [9]}
# ...and, spelled out, the greedy continuation of every prefix length p (T - p tokens each):
FROM_PREFIXES = {1: [6, 7, 5, 6, 7], 2: [7, 5, 6, 7], 3: [5, 6, 7], 4: [6, 9]}


def test_ngram_overlap_by_hand():
    assert ngram_overlap([6, 7, 5, 6, 7], [6, 7, 5, 6, 8], 2) == 1.0  # 67 75 56 67 all in target
    assert ngram_overlap([7, 5, 6, 7], [7, 5, 6, 8], 2) == pytest.approx(2 / 3)
    assert ngram_overlap([6, 9], [6, 8], 2) == 0.0


def test_el_by_hand_both_ways():
    expected = (1 + 2 / 3 + 1 / 2 + 0) / 4  # = 13/24
    assert extraction_likelihood_reference(TOKENS, FROM_PREFIXES, 2) == pytest.approx(expected)
    assert extraction_likelihood_fast(TOKENS, MATCH, FROM_ERRORS, 2) == pytest.approx(expected)


def test_el_fast_needs_only_the_wrong_positions():
    assert list(first_errors(MATCH)) == [2, 2, 2, 4, 4]
    assert continuation_starts(MATCH, max_prefix=4) == [2, 4]
    assert continuation_starts(MATCH, max_prefix=3) == [2]  # p <= 3 never reaches the error at 4
    assert continuation_starts([True] * 5, max_prefix=4) == []


def test_el_of_a_fully_memorized_sequence_is_one_without_any_generation():
    assert extraction_likelihood_fast(TOKENS, [True] * 5, {}, 2) == 1.0


def test_el_counts_repeated_ngrams_only_where_they_still_occur():
    # x = [1,2,1,2,3]; the model continues [1,2,1,2] with 1 instead of 3. The gram (2,1) occurs
    # in x only at start 1, so it counts for prefix p=1 and not for p=2 or p=3.
    tokens, n = [1, 2, 1, 2, 3], 2
    match = [True, True, True, False]
    errors = {3: [1]}
    prefixes = {1: [2, 1, 2, 1], 2: [1, 2, 1], 3: [2, 1]}
    expected = (1 + 1 / 2 + 0) / 3
    assert extraction_likelihood_reference(tokens, prefixes, n) == pytest.approx(expected)
    assert extraction_likelihood_fast(tokens, match, errors, n) == pytest.approx(expected)


def test_teacher_forced_metrics_by_hand():
    match = [True, False, True, True, True, False, True]
    assert memorization_accuracy(match) == pytest.approx(5 / 7)
    assert longest_true_run(match) == 3
    assert longest_true_run([False, False]) == 0
    assert is_extractable([False, True, True], 2)  # from x[:2], x[2:] follows: match[1:] all True
    assert not is_extractable([False, True, True], 1)
    metrics = sequence_metrics(list(range(8)), match, [0.5, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0], extract_k=(6, 7))
    assert metrics == {
        "n_tokens": 8,
        "loss": pytest.approx(0.5),
        "ma": pytest.approx(5 / 7),
        "max_verbatim": 3,
        "extractable_k6": False,
        "extractable_k7": True,
    }


def test_verdicts_use_inclusive_thresholds():
    rows = [{"ma": v} for v in (0.6, 0.59, 0.15, 0.16, 1.0)]
    assert Thresholds().counts(rows) == {"memorized": 2, "over_unlearned": 1}
