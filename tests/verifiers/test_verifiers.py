"""The verifiers on the fake engine: P(Yes) from Yes/No log-probabilities (scored, or read from one generated token's
alternatives on an engine that cannot score), token accounting, the program check."""

from __future__ import annotations

import asyncio
import math

import pytest

from ponder.engine.base import SamplingParams, ScoreUnsupportedError
from ponder.engine.fake import FakeEngine, FakeModel, Script, fake_tokens
from ponder.verifiers import get_verifier
from ponder.verifiers.judging import NO_EVIDENCE, p_yes, p_yes_from_alternatives
from ponder.verifiers.llm import SELF_CHECK, JudgeVerifier, SelfVerifier
from ponder.verifiers.program import AGREES, DISAGREES, ProgramVerifier


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


def test_p_yes_from_alternatives_sums_the_spellings_of_each_reply():
    alternatives = {" Yes": math.log(0.4), "Yes": math.log(0.1), "yes": math.log(0.1), " No": math.log(0.2),
                    "no": math.log(0.1), " The": math.log(0.05)}
    assert p_yes_from_alternatives(alternatives) == pytest.approx(0.6 / 0.9)


def test_a_reply_missing_from_the_alternatives_is_taken_at_the_least_listed_ones_probability():
    only_yes = {" Yes": math.log(0.9), " The": math.log(0.01)}
    assert p_yes_from_alternatives(only_yes) == pytest.approx(0.9 / 0.91)  # P(No) <= 0.01, not 0
    only_no = {" No": math.log(0.6), " I": math.log(0.2)}
    assert p_yes_from_alternatives(only_no) == pytest.approx(0.2 / 0.8)


def test_neither_reply_among_the_alternatives_is_no_evidence():
    assert p_yes_from_alternatives({" The": -0.5, " I": -1.5}) == NO_EVIDENCE == 0.5
    assert p_yes_from_alternatives({}) == NO_EVIDENCE


def verdict_script(position: int, alternatives: dict[str, float]) -> Script:
    """A fake model's script that answers "Yes" at token ``position`` with the given first-token ``alternatives``."""
    return Script("w " * position + "Yes", top_logprobs=[{}] * position + [alternatives])


def test_without_score_the_self_verifier_reads_one_greedy_token_of_a_fork():
    solution = "6 * 7 = \\boxed{42}"
    asked_at = len(fake_tokens(solution)) + len(fake_tokens(SELF_CHECK))  # the reply follows the appended question
    verdict = verdict_script(asked_at, {" Yes": math.log(0.6), " No": math.log(0.2), " The": math.log(0.1)})
    engine = FakeEngine([solution, verdict], can_score=False)
    branch = candidate(engine)
    with pytest.raises(ScoreUnsupportedError):
        asyncio.run(branch.score(" Yes"))
    before, live = dict(vars(branch.usage)), engine.stats().live_branches
    score = asyncio.run(SelfVerifier().score("What is 6 * 7?", branch))
    assert score == pytest.approx(0.75)
    assert branch.text == solution and branch.finish_reason == "stop"  # the candidate itself is untouched
    assert engine.stats().live_branches == live  # the fork that was asked is released
    usage = branch.usage  # the question as prompt tokens, the one reply token as generated, nothing scored
    assert usage.prompt_tokens - before["prompt_tokens"] == len(fake_tokens(SELF_CHECK))
    assert usage.generated_tokens - before["generated_tokens"] == 1
    assert usage.scored_tokens == before["scored_tokens"] == 0


def test_without_score_the_judge_reads_the_first_token_of_its_reply():
    judged = FakeModel([verdict_script(0, {"Yes": math.log(0.1), "No": math.log(0.9)})])
    engine = FakeEngine(["6 * 7 = \\boxed{41}"], models={"judge": judged}, can_score=False)
    branch = candidate(engine)
    live = engine.stats().live_branches
    score = asyncio.run(JudgeVerifier(engine, "judge").score("What is 6 * 7?", branch))
    assert score == pytest.approx(0.1)
    assert engine.stats().live_branches == live
    assert branch.usage.models["judge"]["generated_tokens"] == 1 and "scored_tokens" not in branch.usage.models["judge"]


def test_judge_is_a_model_of_the_generating_engine():
    engine = FakeEngine(["x"], name="qwen2.5-0.5b")
    verifier = get_verifier("judge", engine=engine, judge="qwen2.5-1.5b")
    assert isinstance(verifier, JudgeVerifier) and verifier.engine is engine and verifier.judge == "qwen2.5-1.5b"


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


def test_one_judge_turn_and_one_default_judge_for_every_judge():
    from ponder.search import scorers
    from ponder.strategies import specreason
    from ponder.verifiers.judging import DEFAULT_JUDGE

    chatml = "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert scorers.JUDGE_TURN == chatml.format(scorers.JUDGE_QUESTION)
    assert specreason.JUDGE_TURN == chatml.format(specreason.JUDGE_QUESTION) + "I think the quality score is: "
    assert scorers.DEFAULT_JUDGE == DEFAULT_JUDGE == "qwen2.5-1.5b"
