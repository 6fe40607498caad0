"""Best-of-N on the fake engine with each verifier: the highest-scored candidate wins, verifier tokens are counted."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.strategies import bon

# A majority vote would say 1; the verifiers below prefer the 2.
CANDIDATES = ["so \\boxed{1}", "thus \\boxed{1}", "hence \\boxed{2}"]


def believes_two(context: str, continuation: str) -> float:
    """A scripted verifier: 'Yes' is likely exactly when the text under review answers 2."""
    says_yes = continuation.rstrip().endswith("Yes")
    return -0.1 if says_yes == ("boxed{2}" in context) else -3.0


def run(engine, **options):
    return asyncio.run(bon.STRATEGY(engine, "What is 1+1?", n=3, params=SamplingParams(), seed=0, **options))


def test_self_verifier_picks_the_highest_scored_candidate():
    result = run(FakeEngine(CANDIDATES, score_fn=believes_two), verifier="self")
    assert result.answer == "2"
    assert result.votes["2"] > 0.9  # the winner's P(Yes)
    assert result.usage.scored_tokens > 0  # the Yes and No probes of three candidates


def test_judge_verifier_reads_the_candidate_in_its_own_prompt_and_counts_it():
    engine = FakeEngine(CANDIDATES, score_fn=believes_two)
    result = run(engine, verifier="judge", judge="fake")  # the generating model's name reuses its engine
    assert result.answer == "2"
    assert result.config["judge"] == "fake"
    question_prompt = len("What is 1+1?".split()) + 10  # plus the instruction
    assert result.usage.prompt_tokens > question_prompt + 3 * 10  # three judge prompts were evaluated
    assert engine.stats().live_branches == 0  # judge prompts released too


def test_program_verifier_prefers_the_candidate_whose_program_agrees():
    engine = FakeEngine([
        "```python\nprint(21 + 20)\n```\nThe program prints 41, so \\boxed{42}",  # disagrees: 0.0
        "```python\nprint(6 * 7)\n```\nSo \\boxed{42}",  # agrees: 1.0
        "It is \\boxed{41}",  # no code: 0.5
        "Clearly \\boxed{41}",  # no code: 0.5
    ])
    result = asyncio.run(bon.STRATEGY(engine, "q", n=4, params=SamplingParams(), seed=0, verifier="program"))
    assert result.answer == "42"
    assert result.votes == {"42": 1.0}


def test_score_ties_go_to_the_answer_more_candidates_share():
    # nothing to verify by program: every candidate scores 0.5, so the majority answer wins
    result = run(FakeEngine(CANDIDATES), verifier="program")
    assert result.answer == "1"


def test_a_candidate_without_an_answer_never_beats_one_with_an_answer():
    engine = FakeEngine(["no idea", "so \\boxed{5}"], score_fn=lambda context, reply: -0.1 if ("idea" in context) == (
        reply.rstrip().endswith("Yes")) else -5.0)  # the verifier loves the candidate without an answer
    result = asyncio.run(bon.STRATEGY(engine, "q", n=2, params=SamplingParams(), seed=0, verifier="self"))
    assert result.answer == "5"


def test_candidates_stay_alive_until_scored_then_are_freed():
    engine = FakeEngine(CANDIDATES, score_fn=believes_two)
    run(engine, verifier="self")
    assert engine.stats().live_branches == 0


def test_unknown_verifier_is_a_clear_error():
    with pytest.raises(PonderError, match="self, judge, program"):
        run(FakeEngine(CANDIDATES), verifier="oracle")
