"""short-m@k and first-finish on the fake engine: once m branches finish, the others are cancelled at once."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.strategies import short_mk

SCRIPTS = [
    "a b c d e f g h i j k l m n o p q r s \\boxed{1}",  # 20 tokens
    "a b \\boxed{2}",  # 3 tokens: first to finish
    "a b c d e f g h i j k l m n o \\boxed{1}",  # 16 tokens
    "a b c d \\boxed{2}",  # 5 tokens: second to finish
]


def test_cancels_the_rest_once_m_have_finished_and_votes_among_them():
    engine = FakeEngine(SCRIPTS)
    result = asyncio.run(short_mk.run(engine, "q", n=4, params=SamplingParams(), seed=0, m=2))
    assert [b.finish_reason for b in result.branches] == ["cancelled", "stop", "cancelled", "stop"]
    assert result.votes == {"2": 2}
    # the long ones stopped a few event-loop turns after the second finish (5 tokens), far from their 20 and 16
    assert [b.generated_tokens for b in result.branches] == [8, 3, 8, 5]
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert engine.stats().live_branches == 0


def test_ties_go_to_the_answer_that_finished_first():
    result = asyncio.run(short_mk.run(FakeEngine(SCRIPTS), "q", n=4, params=SamplingParams(), seed=0, m=4))
    assert result.votes == {"2": 2, "1": 2}
    assert result.answer == "2"  # its branches finished first


def test_first_finish_answers_with_the_shortest_branch():
    result = asyncio.run(short_mk.first_finish(FakeEngine(SCRIPTS), "q", n=4, params=SamplingParams(), seed=0))
    assert result.strategy == "first-finish"
    assert result.answer == "2"
    assert [b.finish_reason for b in result.branches].count("stop") == 1


def test_m_larger_than_n_is_a_clear_error():
    with pytest.raises(PonderError, match="m must not exceed n"):
        asyncio.run(short_mk.run(FakeEngine(SCRIPTS), "q", n=2, params=SamplingParams(), seed=0, m=3))
