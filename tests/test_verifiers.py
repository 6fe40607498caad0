"""The verifiers on the fake engine: P(Yes) from Yes/No log-probabilities, token accounting, the program check."""

from __future__ import annotations

import asyncio
import math

import pytest

from ponder.engine.base import SamplingParams
from ponder.engine.fake import FakeEngine, FakeModel
from ponder.verifiers import get_verifier
from ponder.verifiers.llm import SELF_CHECK, JudgeVerifier, SelfVerifier, p_yes
from ponder.verifiers.program import AGREES, DISAGREES, NO_EVIDENCE, ProgramVerifier, last_program


def candidate(engine: FakeEngine):
    async def go():
        root = await engine.open("What is 6 * 7?")
        (branch,) = await root.fork(1)
        return await branch.extend(SamplingParams())

    return asyncio.run(go())


def test_p_yes_normalises_over_yes_and_no():
    assert p_yes(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert p_yes(-1.0, -1.0) == 0.5


def test_self_verifier_continues_the_candidates_own_branch():
    probes = []

    def record(context, continuation):
        probes.append((context, continuation))
        return -0.2 if continuation.endswith("Yes") else -2.0

    engine = FakeEngine(["6 * 7 = \\boxed{42}"], score_fn=record)
    branch = candidate(engine)
    score = asyncio.run(SelfVerifier().score("What is 6 * 7?", branch))
    assert score == pytest.approx(1 / (1 + math.exp(-1.8)))
    # both probes read the question and the solution already in the branch, then the check and a reply
    assert [c for _, c in probes] == [SELF_CHECK + " Yes", SELF_CHECK + " No"]
    assert all(context == "What is 6 * 7?6 * 7 = \\boxed{42}" for context, _ in probes)
    assert branch.usage.scored_tokens == 2 * len((SELF_CHECK + " Yes").split())


def test_judge_verifier_opens_one_prompt_per_candidate_on_the_judge_model_and_counts_it():
    judged = FakeModel([], score_fn=lambda context, reply: -0.1 if ("boxed{42}" in context) == (reply == "Yes")
                       else -4.0)
    engine = FakeEngine(["6 * 7 = \\boxed{42}"], models={"judge": judged})
    branch = candidate(engine)
    prompt_before = branch.usage.prompt_tokens
    before = engine.stats()
    score = asyncio.run(JudgeVerifier(engine, "judge").score("What is 6 * 7?", branch))
    assert score > 0.95
    assert engine.stats().prefills == before.prefills + 1  # one judge prompt, shared by the Yes and No probes
    assert engine.stats().live_branches == before.live_branches  # the judge's prompt was released
    assert branch.usage.prompt_tokens > prompt_before  # the judge's prompt is on the request's bill
    assert branch.usage.models["judge"]["scored_tokens"] == 2


def test_judge_is_a_model_of_the_generating_engine():
    engine = FakeEngine(["x"], name="qwen2.5-0.5b")
    verifier = get_verifier("judge", engine=engine, judge="qwen2.5-1.5b")
    assert isinstance(verifier, JudgeVerifier) and verifier.engine is engine and verifier.judge == "qwen2.5-1.5b"


def test_last_program_takes_the_final_fenced_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\nand ```\nprint(3)\n``` done"
    assert last_program(text) == "print(3)\n"
    assert last_program("no code, \\boxed{3}") is None


@pytest.mark.parametrize("text, expected", [
    ("```python\nprint(6 * 7)\n```\nSo \\boxed{42}", AGREES),
    ("```python\nprint(f'The answer is {6 * 7}')\n```\nSo \\boxed{42}", AGREES),
    ("```python\nprint(6 * 7 + 1)\n```\nSo \\boxed{42}", DISAGREES),
    ("```python\nprint(0.5)\n```\nSo \\boxed{\\frac{1}{2}}", AGREES),  # compared by value
    ("```python\nraise SystemExit(1)\n```\nSo \\boxed{42}", NO_EVIDENCE),  # failed: no evidence either way
    ("```python\nx = 42\n```\nSo \\boxed{42}", NO_EVIDENCE),  # printed nothing
    ("6 * 7 = \\boxed{42}", NO_EVIDENCE),  # no code
])
def test_program_verifier_compares_the_printed_result_with_the_stated_answer(text, expected):
    branch = candidate(FakeEngine([text]))
    assert asyncio.run(ProgramVerifier().score("What is 6 * 7?", branch)) == expected
