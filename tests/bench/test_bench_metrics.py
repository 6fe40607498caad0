"""The estimators of ponder.bench.metrics against brute-force enumeration of every k-subset."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from ponder.bench.metrics import maj_at_k, pass_at_k, summarize, wilson_interval


def brute_maj_at_k(labels: list[int | None], correct: set[int]) -> list[float]:
    """Enumerate every k-subset of the samples, vote, split ties uniformly: the definition, written the slow way."""
    n = len(labels)
    curve = []
    for k in range(1, n + 1):
        total, subsets = Fraction(0), 0
        for subset in itertools.combinations(labels, k):
            subsets += 1
            counts: dict[int, int] = {}
            for label in subset:
                if label is not None:
                    counts[label] = counts.get(label, 0) + 1
            if counts:
                top = max(counts.values())
                winners = [label for label, c in counts.items() if c == top]
                total += Fraction(sum(w in correct for w in winners), len(winners))
        curve.append(float(total / subsets))
    return curve


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def as_classes(labels: list[int | None], correct: set[int]) -> tuple[list[int], list[bool], int]:
    classes = sorted({label for label in labels if label is not None})
    return [labels.count(c) for c in classes], [c in correct for c in classes], labels.count(None)


@pytest.mark.parametrize("labels, correct", [
    ([0, 0, 1], {0}),  # plain majority
    ([0, 1], {0}),  # a 1-1 tie: half the time
    ([0, 1, None, None], {1}),  # abstentions
    ([None, None, None], set()),  # nothing to vote on
    ([0, 0, 1, 1, 2], {0, 2}),  # two classes judged correct (equivalence is not always transitive)
    ([0, 1, 2, 3, 4, 5], {3}),  # all different: every subset is a tie
])
def test_maj_at_k_matches_enumeration_on_hand_cases(labels, correct):
    sizes, flags, abstained = as_classes(labels, correct)
    assert maj_at_k(sizes, flags, abstained) == pytest.approx(brute_maj_at_k(labels, correct), abs=1e-12)


def test_maj_at_k_matches_enumeration_on_random_cases():
    rng = random.Random(7)
    for _ in range(150):
        n, m = rng.randint(1, 9), rng.randint(1, 4)
        labels = [rng.choice([*range(m), None]) for _ in range(n)]
        correct = {c for c in range(m) if rng.random() < 0.4}
        sizes, flags, abstained = as_classes(labels, correct)
        assert maj_at_k(sizes, flags, abstained) == pytest.approx(brute_maj_at_k(labels, correct), abs=1e-12)


def test_maj_at_k_at_n_is_the_vote_of_all_samples():
    # 9 correct of 16 against two wrong classes: the full vote is always right, one sample is right 9/16 of the time.
    curve = maj_at_k([9, 4, 3], [True, False, False])
    assert len(curve) == 16
    assert curve[0] == pytest.approx(9 / 16)
    assert curve[-1] == pytest.approx(1.0)


def test_maj_at_k_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        maj_at_k([1, 2], [True])


@pytest.mark.parametrize("flags", [[True, False, False, True, False], [False] * 4, [True] * 3, [True, False]])
def test_pass_at_k_matches_enumeration(flags):
    n, c = len(flags), sum(flags)
    for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12)


def test_pass_at_k_rejects_k_out_of_range():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_interval_known_values():
    # Reference values: Wilson (1927) score interval, z = 1.96.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(22, 100)
    assert low < 0.22 < high and high - low < 0.2


def record(branch_labels: list[int | None], correct_classes: set[int], *, session="s1", started=0.0, wall=1.0,
           tokens=10, prediction_correct=None) -> dict:
    """A problem record as the runner writes it, reduced to the fields the metrics read."""
    classes = sorted({label for label in branch_labels if label is not None})
    answer_classes = [{"answer": str(c), "size": branch_labels.count(c), "correct": c in correct_classes}
                      for c in classes]
    branches = [{"answer_class": None if label is None else classes.index(label),
                 "correct": label is not None and label in correct_classes} for label in branch_labels]
    if prediction_correct is None:
        prediction_correct = bool(branches) and max(classes, key=branch_labels.count) in correct_classes
    return {"correct": prediction_correct, "answer_classes": answer_classes, "branches": branches,
            "usage": {"prompt_tokens": 5, "generated_tokens": tokens}, "wall_s": wall, "started": started,
            "finished": started + wall, "session": session}


def test_summarize_averages_curves_and_costs():
    records = [
        record([0, 0, 1, None], {0}, started=0.0, wall=2.0, tokens=40),
        record([0, 1, 1, 1], {0}, started=0.5, wall=2.0, tokens=20),
        # a second session (a resumed run) 100 s later: the pause between sessions is not run time
        record([2, 2, 2, 2], {2}, session="s2", started=100.0, wall=3.0, tokens=60),
    ]
    m = summarize("sc", records)
    assert (m.problems, m.correct, m.samples) == (3, 2, 4)
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.generated_tokens == pytest.approx(40)
    assert m.prompt_tokens == pytest.approx(5)
    assert m.latency_s == pytest.approx(7 / 3)
    assert m.wall_s == pytest.approx((2.5 + 3.0) / 3)  # session 1 spans 0..2.5 with two problems in flight
    assert m.tokens_per_s == pytest.approx(120 / 5.5)
    expected_maj = [sum(col) / 3 for col in zip(brute_maj_at_k([0, 0, 1, None], {0}),
                                                   brute_maj_at_k([0, 1, 1, 1], {0}),
                                                   brute_maj_at_k([2, 2, 2, 2], {2}))]
    assert m.maj_at_k == pytest.approx(expected_maj)
    expected_pass = [(brute_pass_at_k([True, True, False, False], k) + brute_pass_at_k([True, False, False, False], k)
                      + 1.0) / 3 for k in range(1, 5)]
    assert m.pass_at_k == pytest.approx(expected_pass)


def test_summarize_counts_a_failed_problem_as_wrong_at_every_k():
    failed = {"correct": False, "error": "prompt too long", "branches": [], "usage": {"prompt_tokens": 0,
              "generated_tokens": 0}, "wall_s": 0.0, "started": 0.0, "finished": 0.0, "session": "s1"}
    m = summarize("sc", [record([0, 0], {0}), failed])
    assert m.samples == 2
    assert m.maj_at_k == pytest.approx([0.5, 0.5])
    assert m.pass_at_k == pytest.approx([0.5, 0.5])


def test_summarize_draws_no_curve_for_strategies_without_independent_samples():
    m = summarize("greedy", [record([0], {0}), record([1], {0})])
    assert m.maj_at_k is None and m.pass_at_k is None and m.samples is None
    assert m.accuracy == 0.5
    assert m.ci95 == pytest.approx(wilson_interval(1, 2))


def test_maj_at_k_with_sixteen_distinct_answers_splits_every_tie():
    # The worst profile for the DP (16 singletons): every subset is a k-way tie, so each answer wins 1/16.
    curve = maj_at_k([1] * 16, [True] + [False] * 15)
    assert curve == pytest.approx([1 / 16] * 16)
    assert math.isclose(sum(maj_at_k([1] * 16, [True] * 16)), 16.0)
