"""Every strategy takes a token budget, never exceeds it, and reports every generated token."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, Script
from ponder.strategies import SEARCHES, STRATEGIES

# Strategies over two models need a small and a large one, and the searches a judge model by default; their budgets
# are tested in their own files (generated and scored tokens together, for the searches).
TWO_MODELS = {"cascade", "specreason", "glimprouter", *SEARCHES}
ONE_MODEL = sorted(set(STRATEGIES) - TWO_MODELS)

TEN_TOKENS = [Script("a b c d e f g h i \\boxed{7}", confidences=[5.0] * 10),
              Script("a b c d e f g h i \\boxed{8}", confidences=[5.0] * 10)]


@pytest.mark.parametrize("name", ONE_MODEL)
@pytest.mark.parametrize("budget", [3, 17, 45])
def test_budget_is_never_exceeded(name, budget):
    def run(engine, budget):
        return asyncio.run(STRATEGIES[name](engine, "q", n=8, params=SamplingParams(), seed=0, budget=budget))

    unlimited = run(FakeEngine(TEN_TOKENS), None).usage.generated_tokens
    engine = FakeEngine(TEN_TOKENS)
    result = run(engine, budget)
    assert result.usage.generated_tokens <= budget
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    if unlimited > budget:  # the budget, not the strategy, ended some branch
        assert any(b.finish_reason == "halted" for b in result.branches)
    assert result.config["budget"] == budget
    assert engine.stats().live_branches == 0


@pytest.mark.parametrize("name", ONE_MODEL)
def test_without_a_budget_every_token_is_still_counted(name):
    result = asyncio.run(STRATEGIES[name](FakeEngine(TEN_TOKENS), "q", n=4, params=SamplingParams(), seed=0))
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches) > 0
    assert result.usage.prompt_tokens > 0


def test_a_non_positive_budget_is_a_clear_error():
    with pytest.raises(PonderError, match="budget"):
        asyncio.run(STRATEGIES["sc"](FakeEngine(TEN_TOKENS), "q", n=2, params=SamplingParams(), seed=0, budget=0))
