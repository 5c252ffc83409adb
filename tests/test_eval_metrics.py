"""Evaluation metrics: pass@k (unbiased and first-k), maj@k with ties and equivalent answers, the summary."""

import itertools
from fractions import Fraction
from math import comb

import pytest

from megatron_softgrpo.eval.metrics import (
    GradedSample,
    maj_at_k,
    majority_sample,
    pass_at_k_first,
    pass_at_k_unbiased,
    problem_scores,
    summarize,
)
from megatron_softgrpo.rewards.math import MathGrader, exact_answer_classes


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_unbiased_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k_unbiased(n, c, k) == pytest.approx(
                _brute_force_pass_at_k(n, c, k), abs=1e-12
            )


def test_unbiased_pass_at_k_is_stable_for_large_n():
    for n, c, k in [(32, 1, 16), (32, 5, 32), (200, 3, 100), (1000, 1, 1), (1000, 999, 500)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k_unbiased(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        pass_at_k_unbiased(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k_unbiased(4, 1, 5)


def test_pass_at_k_first_on_hand_made_rows():
    row = [False, False, True, False]
    assert [pass_at_k_first(row, k) for k in (1, 2, 3, 4)] == [False, False, True, True]
    assert not pass_at_k_first([False] * 4, 4)


def _samples(classes, correct, lengths=None, truncated=None):
    lengths = lengths or [10] * len(classes)
    truncated = truncated or [False] * len(classes)
    return [GradedSample(ok, c, n, t) for c, ok, n, t in zip(classes, correct, lengths, truncated)]


def test_majority_vote_ties_go_to_the_earliest_answer():
    # class 0 (wrong) and class 1 (right) tie 2:2 over four samples -> class 0 was voted first
    samples = _samples([0, 1, 1, 0], [False, True, True, False])
    assert majority_sample([0, 1, 1, 0]) == 0
    assert [maj_at_k(samples, k) for k in (1, 2, 3, 4)] == [False, False, True, False]
    # samples without an answer do not vote; no votes at all is wrong
    assert majority_sample([None, None, 2, None]) == 2
    assert not maj_at_k(_samples([None, None], [False, False]), 2)
    assert majority_sample([None]) is None


def test_majority_vote_counts_equivalent_answers_together():
    answers = [r"\frac{1}{2}", "7", "0.5", "7", "1/2"]
    grader = MathGrader(num_workers=1, timeout_s=60.0)
    try:
        correct = grader.grade_answers(answers, ["0.5"] * len(answers))
        (classes,) = grader.classes([answers])
    finally:
        grader.close()
    assert correct == [True, False, True, False, True]
    assert classes == [0, 1, 0, 1, 0]
    samples = _samples(classes, correct)
    assert maj_at_k(samples, 5)  # 1/2 written three ways: 3 votes against 2
    assert maj_at_k(samples, 4)  # 2:2, and 1/2 was voted first
    assert not maj_at_k(samples[1:], 3)  # "7", "0.5", "7": 7 wins
    # by exact text alone, "7" would win with 2 votes against 1+1+1
    assert not maj_at_k(_samples(exact_answer_classes(answers), correct), 5)


def test_summarize_a_hand_made_table():
    table = [
        _samples([0, 0, 2, 3], [True, True, False, False], lengths=[10, 20, 30, 40]),
        _samples(
            [None, 1, 1, None], [False, False, False, False], truncated=[True, False, False, True]
        ),
        _samples([0, 1, 2, 2], [False, False, True, True]),
    ]
    m = summarize(table, ks=(1, 2, 4, 8))
    assert (m.n, m.problems) == (4, 3)
    assert m.mean_at_n == pytest.approx((2 / 4 + 0 + 2 / 4) / 3)
    assert list(m.pass_at_k) == [1, 2, 4]  # k <= n only
    for k in (1, 2, 4):
        assert m.pass_at_k[k] == pytest.approx((_brute_force_pass_at_k(4, 2, k) * 2 + 0) / 3)
    assert m.pass_at_k_first == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(1 / 3),
        4: pytest.approx(2 / 3),
    }
    # maj: problem 0 -> class 0 (right) at every k; problem 1 -> never right; problem 2 -> k=4: class 2 (right)
    assert m.maj_at_k == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 4: pytest.approx(2 / 3)}
    assert m.mean_length == pytest.approx((10 + 20 + 30 + 40 + 10 * 8) / 12)
    assert m.truncated_fraction == pytest.approx(2 / 12)
    assert summarize(table, ks=(1,), vote=False).maj_at_k == {}


def test_problem_scores_average_to_the_summary():
    table = [
        _samples([0, 0, 2, 3], [True, True, False, False]),
        _samples([None, 1, 1, None], [False, False, False, False]),
        _samples([0, 1, 2, 2], [False, False, True, True]),
    ]
    m = summarize(table, ks=(1, 2, 4))
    scores = [problem_scores(p, (1, 2, 4)) for p in table]
    assert set(scores[0]) == {"pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"}
    assert scores[0]["pass@1"] == 0.5 and scores[1]["pass@4"] == 0.0
    mean = lambda key: sum(s[key] for s in scores) / len(scores)  # noqa: E731
    assert mean("pass@1") == pytest.approx(m.mean_at_n)
    for k in (2, 4):
        assert mean(f"pass@{k}") == pytest.approx(m.pass_at_k[k])
    for k in (1, 2, 4):
        assert mean(f"maj@{k}") == pytest.approx(m.maj_at_k[k])
    assert "maj@1" not in problem_scores(table[0], (1,), vote=False)


def test_summarize_rejects_ragged_or_empty_tables():
    with pytest.raises(ValueError, match="same positive number of samples"):
        summarize([_samples([0], [True]), _samples([0, 0], [True, True])])
    with pytest.raises(ValueError):
        summarize([])
