"""Step scorers on the fake engine: what each returns for a partial solution, what it costs, and what it releases.

Partial solutions are built by hand here (``Partial`` below): a branch of the generating model that wrote one step
per ``extend_step``, its parent, and its steps. Scripts play from a branch's length, one word per token (see
ponder.engine.fake), so a fork that continues a partial solution of k tokens writes its script's token k next.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest

from ponder.engine.base import Branch, PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, FakeModel, Script, fake_tokens
from ponder.prompts import math_messages
from ponder.search.scorers import (JUDGE_TURN, PROBE, PROBE_TOKENS, PROBES, JudgeScorer, LogprobScorer, ProbeScorer,
                            aggregate, get_scorer)
from ponder.search.steps import extend_step

GEN, JUDGE = "qwen2.5-0.5b", "qwen2.5-1.5b"
PROMPT = math_messages("q")[0]["content"]  # the fake engine's prompt text of a one-message chat
PROMPT_TOKENS = len(PROMPT.split())
TURN_TOKENS = len(fake_tokens(JUDGE_TURN))


@dataclass(eq=False)
class Partial:
    parent: Partial | None
    branch: Branch
    step: str = ""
    tokens: int = 0

    @property
    def steps(self) -> list[str]:
        return (self.parent.steps if self.parent is not None else []) + ([self.step] if self.step else [])


async def grow(parent: Partial, params: SamplingParams = SamplingParams()) -> Partial:
    """A child of ``parent`` that wrote one step on a fork of its branch."""
    (branch,) = await parent.branch.fork(1)
    step = await extend_step(branch, params, cap=50)
    return Partial(parent, branch, step.text, step.tokens)


def p_yes_by_last_step(values: dict[str, float], seen: list[str]):
    """A judge's score_fn: P(Yes) = ``values[s]`` for the steps that end with ``s``; records what it judged."""

    def score_fn(context: str, reply: str) -> float:
        assert context.endswith(JUDGE_TURN)
        judged = context[:-len(JUDGE_TURN)]
        if reply == "Yes":
            seen.append(judged)
        value = next(v for step, v in values.items() if judged.endswith(step))
        return math.log(value if reply == "Yes" else 1 - value)

    return score_fn


def test_the_judge_reads_the_question_once_and_every_step_once():
    seen: list[str] = []
    values = {"a\n\n": 0.9, "b\n\n": 0.2, "c\n\n": 0.6}
    judge_model = FakeModel(["unused"], score_fn=p_yes_by_last_step(values, seen))
    engine = FakeEngine(["a\n\nc\n\n", "b\n\n"], name=GEN, models={JUDGE: judge_model})

    async def go():
        root = Partial(None, await engine.open(math_messages("q")))
        scorer = JudgeScorer(engine, JUDGE, root.branch.usage)
        first, second = await grow(root), await grow(root)
        values = await asyncio.gather(scorer.score("q", first), scorer.score("q", second))
        deeper = await grow(first)  # the first child's script goes on with "c"
        values.append(await scorer.score("q", deeper))
        for partial in (first, second):
            scorer.forget(partial)
        live_while_open = engine.stats().live_branches
        scorer.close()
        return values, root.branch.usage, live_while_open, engine.stats().live_branches

    values, usage, live_while_open, live_after = asyncio.run(go())
    assert values == pytest.approx([0.9, 0.2, 0.6])
    assert seen == [PROMPT + "a\n\n", PROMPT + "b\n\n", PROMPT + "a\n\nc\n\n"]
    judge = usage.models[JUDGE]
    # The prompt once, each step once (the deeper node's reader is a fork of its parent's), a question per node.
    assert judge["prompt_tokens"] == PROMPT_TOKENS + 3 + 3 * TURN_TOKENS
    assert judge["scored_tokens"] == 3 * 2 == usage.scored_tokens  # "Yes" and "No"
    assert usage.models[GEN] == {"prompt_tokens": PROMPT_TOKENS, "prompt_tokens_shared": 3 * PROMPT_TOKENS + 1,
                                 "generated_tokens": 3}
    # Four generator branches are live; on the judge, the prompt and the deeper node's reader until close().
    assert live_while_open == 4 + 2 and live_after == 4


def test_the_generating_model_judges_on_the_candidates_own_branch():
    seen: list[str] = []
    engine = FakeEngine(["a\n\n"], name=GEN, score_fn=p_yes_by_last_step({"a\n\n": 0.7}, seen))

    async def go():
        root = Partial(None, await engine.open(math_messages("q")))
        scorer = get_scorer("judge", engine=engine, usage=root.branch.usage, judge=GEN)
        value = await scorer.score("q", await grow(root))
        return value, root.branch.usage

    value, usage = asyncio.run(go())
    assert value == pytest.approx(0.7) and seen == [PROMPT + "a\n\n"]
    assert set(usage.models) == {GEN}  # no judge prompt opened
    assert usage.models[GEN]["prompt_tokens"] == PROMPT_TOKENS + TURN_TOKENS


def test_without_score_the_judge_reads_the_first_token_of_its_reply():
    """On a server without prompt logprobs (llama-cpp-python's) the judge generates the first token of its reply
    greedily and reads P(Yes) from that token's alternatives."""
    step = "a\n\n"
    asked_at = len(fake_tokens(step)) + TURN_TOKENS  # the reply follows the step and the judge's question
    reply = Script("w " * asked_at + "Yes",
                   top_logprobs=[{}] * asked_at + [{"Yes": math.log(0.3), "No": math.log(0.6), "The": -3.0}])
    engine = FakeEngine([step], name=GEN, models={JUDGE: FakeModel([reply])}, can_score=False)

    async def go():
        root = Partial(None, await engine.open(math_messages("q")))
        scorer = JudgeScorer(engine, JUDGE, root.branch.usage)
        value = await scorer.score("q", await grow(root))
        scorer.close()
        return value, root.branch.usage, engine.stats().live_branches

    value, usage, live = asyncio.run(go())
    assert value == pytest.approx(1 / 3)
    assert usage.models[JUDGE]["generated_tokens"] == 1 and "scored_tokens" not in usage.models[JUDGE]
    assert live == 2  # the generator's prompt and step; every branch of the judge is released


def probe_script(answer: str) -> str:
    """A probe fork's script: after a one-token step and the forced text, it writes ``answer`` and a brace."""
    return "s " + " ".join(["x"] * len(fake_tokens(PROBE))) + f" {answer}}} and more"


def test_probe_agreement_is_the_share_of_probes_that_agree():
    engine = FakeEngine(["a\n\n", probe_script("5"), probe_script("5"), probe_script("7"), probe_script("5")],
                        name=GEN)

    async def go():
        root = Partial(None, await engine.open(math_messages("q")))
        scorer = ProbeScorer(SamplingParams(), seed=0)
        partial = await grow(root)
        value = await scorer.score("q", partial)
        return value, scorer, root.branch.usage

    value, scorer, usage = asyncio.run(go())
    assert value == 0.75
    assert scorer.generated == PROBES  # each probe wrote its one-token answer and stopped at the closed box
    assert usage.generated_tokens == 1 + PROBES
    assert usage.prompt_tokens == PROMPT_TOKENS + PROBES * len(fake_tokens(PROBE))
    assert engine.stats().live_branches == 2  # the root and the partial: every probe was released


def test_a_probe_without_an_answer_counts_against_agreement():
    rambling = "s " + " ".join(["x"] * (len(fake_tokens(PROBE)) + PROBE_TOKENS + 5))
    engine = FakeEngine(["a\n\n", probe_script("5"), rambling, rambling, rambling], name=GEN)

    async def go():
        root = Partial(None, await engine.open(math_messages("q")))
        scorer = ProbeScorer(SamplingParams(), seed=0)
        return await scorer.score("q", await grow(root)), scorer

    value, scorer = asyncio.run(go())
    assert value == 1 / PROBES
    assert scorer.generated == 1 + 3 * PROBE_TOKENS <= scorer.reserve


def test_logprob_is_the_geometric_mean_token_probability_of_the_last_step():
    engine = FakeEngine([Script("a b\n\nc d e\n\n", logprobs=[-1.0, -1.0, -0.2, -0.4, -0.3])], name=GEN)

    async def go(params):
        root = Partial(None, await engine.open(math_messages("q")))
        first = await grow(root, params)
        second = Partial(first, first.branch)
        step = await extend_step(first.branch, params, cap=50)
        second.step, second.tokens = step.text, step.tokens
        return await LogprobScorer().score("q", second)

    assert asyncio.run(go(SamplingParams(logprobs=True))) == pytest.approx(math.exp(-0.3))
    with pytest.raises(PonderError, match="needs per-token logprobs"):
        asyncio.run(go(SamplingParams()))


def test_aggregations_over_the_steps_of_a_path():
    scores = [0.9, 0.5, 0.8]
    assert aggregate(scores, "last") == 0.8
    assert aggregate(scores, "min") == 0.5
    assert aggregate(scores, "prod") == pytest.approx(0.36)


def test_an_unknown_scorer_names_the_known_ones():
    with pytest.raises(PonderError, match="judge, probe, logprob"):
        get_scorer("oracle", engine=FakeEngine(["a"]), usage=None)


def test_a_separate_judge_reads_the_question_in_the_runs_prompt():
    from ponder.prompts import MathPrompt
    seen: list[str] = []
    judge_model = FakeModel(["unused"], score_fn=p_yes_by_last_step({"a\n\n": 0.8}, seen))
    engine = FakeEngine(["a\n\n"], name=GEN, models={JUDGE: judge_model})
    prompt = MathPrompt(system="Be brief.")

    async def go():
        root = Partial(None, await engine.open(prompt.messages("q")))
        scorer = get_scorer("judge", engine=engine, usage=root.branch.usage, judge=JUDGE, prompt=prompt)
        value = await scorer.score("q", await grow(root))
        scorer.close()
        return value

    assert asyncio.run(go()) == pytest.approx(0.8)
    assert seen == ["Be brief. " + PROMPT + "a\n\n"]  # the fake engine joins a chat's messages with spaces
