"""Reasoning steps: where a step ends, when the solution is finished, and how long the next step may be."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams, Usage
from ponder.engine.fake import FakeEngine
from ponder.search.steps import StepAllowance, extend_step, states_answer


def steps_of(script: str, *, cap: int = 100, stop: tuple[str, ...] = ()) -> list:
    """Extend one branch of ``script`` step by step until a step finishes the solution."""

    async def go():
        branch = await FakeEngine([script]).open("q")
        steps = []
        while not steps or not steps[-1].finished:
            steps.append(await extend_step(branch, SamplingParams(stop=stop), cap=cap))
        return steps

    return [(s.text, s.tokens, s.finished) for s in asyncio.run(go())]


def test_a_step_ends_at_a_blank_line_which_it_keeps():
    assert steps_of("First, add.\n\nThen 2 + 2 = 4.\n\nSo \\boxed{4}") == [
        ("First, add.\n\n", 2, False), ("Then 2 + 2 = 4.\n\n", 6, False), ("So \\boxed{4}", 2, True)]


def test_a_complete_boxed_answer_finishes_the_solution_even_at_a_blank_line():
    assert steps_of("So \\boxed{4}.\n\nDone.") == [("So \\boxed{4}.\n\n", 2, True)]
    assert states_answer("\\boxed{\\frac{1}{2}}") and not states_answer("\\boxed{\\frac{1}{2}")


def test_end_of_generation_the_cap_and_other_stop_strings_finish_the_solution():
    assert steps_of("a b\n\nc") == [("a b\n\n", 2, False), ("c", 1, True)]  # end of generation
    assert steps_of("a b c d\n\n", cap=3) == [("a b c ", 3, True)]  # the cap
    assert steps_of("a b END c\n\n", stop=("END",)) == [("a b END ", 3, True)]


def test_the_allowance_is_the_tightest_of_step_cap_solution_length_and_budget():
    usage = Usage()

    async def solution_of(tokens: int):
        branch = await FakeEngine(["x " * tokens]).open("q", usage)
        await branch.extend(SamplingParams())
        return branch

    solution = asyncio.run(solution_of(10))  # 10 generated tokens, so 10 spent of the budget
    assert StepAllowance(step_tokens=5, max_tokens=100, budget=None, usage=usage).step(solution) == 5
    assert StepAllowance(step_tokens=50, max_tokens=13, budget=None, usage=usage).step(solution) == 3
    usage.add("scored_tokens", 4, "fake")  # scored tokens are spent too
    budgeted = StepAllowance(step_tokens=50, max_tokens=100, budget=20, usage=usage)
    assert budgeted.step(solution) == 6 and budgeted.room(solution, reserve=2) == 4
    assert budgeted.step(solution, reserve=10) == 0  # never negative
    with pytest.raises(PonderError, match="step_tokens"):
        StepAllowance(step_tokens=0, max_tokens=100, budget=None, usage=usage)
    with pytest.raises(PonderError, match="budget"):
        StepAllowance(step_tokens=1, max_tokens=100, budget=0, usage=usage)
