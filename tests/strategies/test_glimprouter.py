"""GlimpRouter on the two-model fake engine: the small model's one-token glimpse routes each step by its entropy, the
written step is carried to the other model, and the large model writes the final answer.

The scripts are aligned conversations (see ponder.engine.fake): a model writes its script's token k when its branch
holds k tokens, one word each; the small script's entropies are what its glimpse sees at each position.
"""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import SamplingParams
from ponder.engine.fake import FakeEngine, Script
from ponder.prompts import math_messages
from ponder.strategies import glimprouter

SMALL, LARGE = "qwen2.5-0.5b", "qwen2.5-1.5b"
PROMPT_TOKENS = len(math_messages("q")[0]["content"].split())

# Positions:     0          1         2           3       4
SMALL_SCRIPT = Script("s1\n\nX\n\ns3\n\nfoo \\boxed{1}", entropies=[0.1, 2.0, 0.2, 0.1, 0.1])
LARGE_SCRIPT = "a\n\nL2\n\nb\n\nso \\boxed{5}"


def run(small=SMALL_SCRIPT, large=LARGE_SCRIPT, params=SamplingParams(), **options):
    engine = FakeEngine([], models={SMALL: [small], LARGE: [large]})
    result = asyncio.run(glimprouter.run(engine, "q", params=params, seed=0, **options))
    assert engine.stats().live_branches == 0 and engine.stats().kv_cells_used == 0  # every branch released
    return result


def routes(result) -> list[str]:
    return [step["by"] for step in result.details["steps"]]


def test_an_uncertain_glimpse_routes_the_step_to_the_large_model():
    result = run()
    assert result.details == {"steps": [
        {"entropy": 0.1, "by": "small", "tokens": 1},
        {"entropy": 2.0, "by": "large", "tokens": 1},
        {"entropy": 0.2, "by": "small", "tokens": 1},
        {"entropy": 0.1, "by": "small", "tokens": 2, "left_out": True},
    ], "large_share": 0.25}
    # The small model's finishing step is left out: the large model writes the end.
    assert result.branches[0].text == "s1\n\nL2\n\ns3\n\nso \\boxed{5}" and result.answer == "5"


def test_the_threshold_decides_and_an_entropy_at_it_goes_to_the_large_model():
    assert routes(run(threshold=0.2)) == ["small", "large", "large", "small"]
    assert routes(run(threshold=2.5)) == ["small", "small", "small", "small"]


def test_each_step_is_carried_to_the_other_model_and_glimpses_are_paid_for():
    small, large = (run().usage.models[m] for m in (SMALL, LARGE))
    assert small["prompt_tokens"] == PROMPT_TOKENS + 1  # "L2"
    assert large["prompt_tokens"] == PROMPT_TOKENS + 2  # "s1", "s3"
    assert small["generated_tokens"] == 4 + 1 + 1 + 2  # four glimpses and three steps
    assert large["generated_tokens"] == 1 + 2  # its step and the end


def test_a_glimpse_at_the_end_of_generation_routes_to_the_large_model():
    result = run(small=Script("s1\n\n", entropies=[0.1]))
    assert routes(result) == ["small", "large", "large", "large"]
    assert [s["entropy"] for s in result.details["steps"]] == [0.1, None, None, None]
    assert result.branches[0].text == "s1\n\nL2\n\nb\n\nso \\boxed{5}"


def test_a_finishing_step_by_the_large_model_is_the_end():
    result = run(large="a\n\n\\boxed{3}\n\nnever read")
    assert routes(result) == ["small", "large"]
    assert result.branches[0].text == "s1\n\n\\boxed{3}\n\n" and result.answer == "3"
    assert result.usage.models[LARGE]["generated_tokens"] == 1


@pytest.mark.parametrize("budget", [1, 2, 4, 7, 10])
def test_the_budget_caps_both_models_glimpses_included(budget):
    result = run(budget=budget)
    assert result.usage.generated_tokens <= budget
    if budget < 11:  # the run without a budget generates 11 tokens: this solution was cut
        assert result.branches[0].finish_reason == "halted" and result.answer is None


def test_max_tokens_caps_the_solution():
    result = run(params=SamplingParams(max_tokens=3))
    assert result.branches[0].text == "s1\n\nL2\n\ns3\n\n" and result.answer is None  # not "3"
    assert result.branches[0].finish_reason == "length"
