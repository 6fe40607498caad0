"""Modified rejection sampling keeps the target's distribution exactly, on a small vocabulary (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from ponder.engine.base import SamplingParams
from ponder.engine.sampling import distribution, draw, speculative_choice

VOCAB = np.arange(6)


def step(p, q, rng) -> int:
    """One speculative position: the draft proposes from q, the target keeps it or replaces it."""
    drafted = draw(VOCAB, q, rng)
    choice = speculative_choice((VOCAB, p), (VOCAB, q), drafted, rng)
    return drafted if choice is None else choice


@pytest.mark.parametrize("q", [
    np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3]),  # the draft favours what the target rarely picks
    np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.05]),  # a close draft
    np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]),  # a draft that never proposes most of the target's tokens
])
def test_output_has_the_target_distribution(q):
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    rng = np.random.default_rng(1234)
    trials = 40_000
    counts = np.bincount([step(p, q, rng) for _ in range(trials)], minlength=len(VOCAB))
    assert chisquare(counts, p * trials).pvalue > 1e-3
    # and it is not simply the draft's distribution
    if not np.allclose(p, q):
        assert chisquare(counts, np.maximum(q, 1e-9) * trials).pvalue < 1e-6


def test_acceptance_rate_is_the_overlap_of_the_distributions():
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    rng = np.random.default_rng(7)
    accepted = 0
    for _ in range(20_000):
        drafted = draw(VOCAB, q, rng)
        accepted += speculative_choice((VOCAB, p), (VOCAB, q), drafted, rng) is None
    assert accepted / 20_000 == pytest.approx(np.minimum(p, q).sum(), abs=0.01)


def test_greedy_target_keeps_exactly_its_argmax():
    row = np.array([0.1, 3.0, 2.9, -1.0])
    greedy = distribution(row, SamplingParams(temperature=0.0))
    rng = np.random.default_rng(0)
    assert speculative_choice(greedy, (np.array([1]), np.array([1.0])), 1, rng) is None
    assert speculative_choice(greedy, (np.array([2]), np.array([1.0])), 2, rng) == 1


def test_distribution_applies_top_k_and_top_p():
    row = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    cand, probs = distribution(row, SamplingParams(temperature=1.0, top_k=3, top_p=1.0))
    assert sorted(cand.tolist()) == [0, 1, 2]
    assert probs.sum() == pytest.approx(1.0)
    cand, _ = distribution(row, SamplingParams(temperature=1.0, top_k=0, top_p=0.6))
    assert sorted(cand.tolist()) == [0, 1]
