"""The small-to-large cascade on the two-model fake engine: escalate below tau, not at or above it."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.strategies import cascade

SMALL, LARGE = "qwen2.5-0.5b", "qwen2.5-1.5b"


def engine_of(small: list[str], large: list[str]) -> FakeEngine:
    return FakeEngine(["\\boxed{0}"], models={SMALL: small, LARGE: large})


def run(engine: FakeEngine, **options):
    return asyncio.run(cascade.run(engine, "q", params=SamplingParams(), seed=0, **options))


def test_an_agreeing_small_vote_is_the_answer_and_the_large_model_never_runs():
    engine = engine_of(["so \\boxed{7}", "\\boxed{7}", "\\boxed{8}", "it is \\boxed{7}"], ["\\boxed{9}"])
    result = run(engine)
    assert result.answer == "7" and result.votes == {"7": 3, "8": 1}
    assert result.details == {"escalated": False, "small_answer": "7", "small_share": 0.75}
    assert list(result.usage.models) == [SMALL] and len(result.branches) == 4
    assert engine.stats().live_branches == 0


def test_a_split_small_vote_escalates_to_the_large_models_greedy_answer():
    engine = engine_of(["\\boxed{7}", "\\boxed{8}", "\\boxed{7}", "\\boxed{8}"], ["the answer is \\boxed{9}"])
    result = run(engine)
    assert result.answer == "9" and result.votes == {"9": 1}
    assert result.details == {"escalated": True, "small_answer": "7", "small_share": 0.5}
    assert [b.answer for b in result.branches] == ["7", "8", "7", "8", "9"]  # the small model's, then the large's
    assert result.usage.models[LARGE]["generated_tokens"] == 4
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert engine.stats().live_branches == 0 and engine.stats().kv_cells_used == 0


def test_samples_without_an_answer_count_against_agreement():
    engine = engine_of(["\\boxed{7}", "I am not sure", "\\boxed{7}", "hmm"], ["\\boxed{9}"])
    assert run(engine).details["small_share"] == 0.5
    assert run(engine_of(["\\boxed{7}", "I am not sure", "\\boxed{7}", "hmm"], ["\\boxed{9}"]), tau=0.5).answer == "7"


def test_escalation_to_self_consistency_over_m_large_samples():
    engine = engine_of(["\\boxed{1}", "\\boxed{2}"], ["\\boxed{9}", "\\boxed{4}", "\\boxed{9}"])
    result = run(engine, k=2, m=3)
    assert result.details["escalated"] and result.answer == "9" and result.votes == {"9": 2, "4": 1}
    assert len(result.branches) == 5


@pytest.mark.parametrize("budget, large_tokens", [(3, 0), (8, 2), (20, 5)])
def test_the_budget_caps_both_models_together(budget, large_tokens):
    engine = engine_of(["a b \\boxed{1}", "a b \\boxed{2}"], ["a b c d \\boxed{9}"])
    result = run(engine, k=2, budget=budget)
    assert result.usage.generated_tokens <= budget
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert result.usage.models.get(LARGE, {}).get("generated_tokens", 0) == large_tokens
    assert engine.stats().live_branches == 0


def test_bad_options_and_missing_models_are_clear_errors():
    with pytest.raises(PonderError, match="tau"):
        run(engine_of(["x"], ["y"]), tau=0)
    with pytest.raises(PonderError, match="k and m"):
        run(engine_of(["x"], ["y"]), m=0)
    with pytest.raises(PonderError, match="no model 'huge'"):
        run(engine_of(["\\boxed{1}", "\\boxed{2}"], ["y"]), large="huge")
