"""SpecReason on the two-model fake engine: the small model drafts, the large model scores each step from its digit
log-probabilities, accepts at the threshold, rewrites below it, and writes the final answer.

The scripts are aligned conversations (see ponder.engine.fake): a model writes its script's token k when its branch
holds k tokens, one word each, so each model's script says what it would write at each step.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from ponder.engine.base import SamplingParams
from ponder.engine.fake import FakeEngine, FakeModel, fake_tokens
from ponder.prompts import math_messages
from ponder.strategies import specreason
from ponder.strategies.specreason import JUDGE_TURN, expected_digit

SMALL, LARGE = "qwen2.5-0.5b", "qwen2.5-1.5b"
PROMPT_TOKENS = len(math_messages("q")[0]["content"].split())
JUDGE_TOKENS = len(fake_tokens(JUDGE_TURN))

# The small model drafts four steps; the large model would write "Right." at step 2 and "So \boxed{2}" at the end.
SMALL_SCRIPT = "Add.\n\nWrong.\n\nThen.\n\nSo \\boxed{1}"
LARGE_SCRIPT = "x\n\nRight.\n\ny\n\nSo \\boxed{2}"


def judge(scores: dict[str, float], seen: list[str] | None = None):
    """A large model's score_fn for the digits after the judge turn: the step that ends with a key of ``scores``
    gets that digit (all probability on it; a fraction splits it between the two digits around it), others 9."""

    def score_fn(context: str, digit: str) -> float:
        assert context.endswith(JUDGE_TURN)
        judged = context[:-len(JUDGE_TURN)]
        if seen is not None and digit == "0":
            seen.append(judged)
        score = next((s for step, s in scores.items() if judged.endswith(step)), 9)
        low, weight = int(score), score - int(score)
        probability = (1 - weight) * (int(digit) == low) + weight * (int(digit) == low + 1)
        return math.log(probability) if probability > 0 else -50.0

    return score_fn


def engine_of(small: str, large: str, scores: dict[str, float], seen: list[str] | None = None) -> FakeEngine:
    return FakeEngine([], models={SMALL: [small], LARGE: FakeModel([large], score_fn=judge(scores, seen))})


def run(engine: FakeEngine, **options):
    return asyncio.run(specreason.run(engine, "q", params=SamplingParams(), seed=0, **options))


def test_expected_digit_renormalises_over_the_digits():
    assert expected_digit([math.log(0.1)] * 10) == pytest.approx(4.5)
    assert expected_digit([-50.0] * 7 + [math.log(0.2)] + [-50.0] + [math.log(0.2)]) == pytest.approx(8.0)


def test_steps_scored_at_the_threshold_are_accepted_and_those_below_are_rewritten():
    seen: list[str] = []
    engine = engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {"Wrong.\n\n": 3, "Then.\n\n": 7}, seen)
    result = run(engine)
    assert result.branches[0].text == "Add.\n\nRight.\n\nThen.\n\nSo \\boxed{2}"
    assert result.answer == "2"  # the large model's final answer, not the small model's \boxed{1}
    assert result.details == {"steps": [
        {"score": 9.0, "accepted": True, "draft_tokens": 1},
        {"score": 3.0, "accepted": False, "draft_tokens": 1, "rewrite_tokens": 1},
        {"score": 7.0, "accepted": True, "draft_tokens": 1},
    ], "acceptance_rate": 0.6667}
    # The judge read each draft right after the solution so far (the rejected draft is not in it).
    prompt = math_messages("q")[0]["content"]  # the fake engine's prompt text of a one-message chat
    assert seen == [prompt + "Add.\n\n", prompt + "Add.\n\nWrong.\n\n", prompt + "Add.\n\nRight.\n\nThen.\n\n"]
    assert engine.stats().live_branches == 0 and engine.stats().kv_cells_used == 0


def test_each_model_evaluates_the_other_models_steps_once():
    result = run(engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {"Wrong.\n\n": 3}))
    small, large = result.usage.models[SMALL], result.usage.models[LARGE]
    # The large model reads each of the three judged drafts once (an accepted one is not evaluated again) and a judge
    # turn per draft; the small model reads the one rewrite.
    assert large["prompt_tokens"] == PROMPT_TOKENS + 3 + 3 * JUDGE_TOKENS
    assert small["prompt_tokens"] == PROMPT_TOKENS + 1
    assert large["scored_tokens"] == 3 * 10 == result.usage.scored_tokens  # ten digits per judged step
    assert small["generated_tokens"] == 1 + 1 + 1 + 2  # four drafts; the last, finished one is not judged
    assert large["generated_tokens"] == 1 + 2  # the rewrite and the final answer


def test_a_threshold_between_scores_decides():
    steps = run(engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {"Then.\n\n": 6.5})).details["steps"]
    assert [s["accepted"] for s in steps] == [True, True, False] and steps[2]["score"] == pytest.approx(6.5)
    lenient = run(engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {"Then.\n\n": 6.5}), threshold=6).details["steps"]
    assert [s["accepted"] for s in lenient] == [True, True, True]


def test_a_rewrite_that_finishes_the_solution_ends_the_run():
    engine = engine_of(SMALL_SCRIPT, "x\n\n\\boxed{5}\n\nmore", {"Wrong.\n\n": 0})
    result = run(engine)
    assert result.branches[0].text == "Add.\n\n\\boxed{5}\n\n" and result.answer == "5"
    assert result.usage.models[SMALL]["generated_tokens"] == 2  # no draft after the end
    assert engine.stats().live_branches == 0


@pytest.mark.parametrize("budget", [5, 12, 25, 35])
def test_the_budget_caps_generated_and_scored_tokens(budget):
    engine = engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {"Wrong.\n\n": 3})
    result = run(engine, budget=budget)
    assert result.usage.generated_tokens + result.usage.scored_tokens <= budget
    assert result.branches[0].finish_reason == "halted"  # the run without a budget spends 38 tokens
    assert engine.stats().live_branches == 0 and engine.stats().kv_cells_used == 0


def test_max_tokens_caps_the_solution():
    result = asyncio.run(specreason.run(engine_of(SMALL_SCRIPT, LARGE_SCRIPT, {}), "q", params=SamplingParams(
        max_tokens=2), seed=0))
    assert result.branches[0].text == "Add.\n\nWrong.\n\n"  # two accepted steps fill the solution
    assert result.answer is None and result.branches[0].finish_reason == "length"
