"""The fake engine's own rules: several models, scripts played from the branch's length, append, scripted records."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams, Usage
from ponder.engine.fake import FakeEngine, FakeModel, Script

GREEDY = SamplingParams(temperature=0.0)


def two_models(**large) -> FakeEngine:
    return FakeEngine(["small one", "small two"], name="small",
                      models={"large": FakeModel(["large one"], **large)})


def test_each_model_plays_its_own_scripts_and_counts_its_own_usage():
    engine = two_models()

    async def go():
        usage = Usage()
        small = await engine.open("q", usage)
        large = await engine.open("q", usage, model="large")
        s1, s2 = await small.fork(2)
        (l1,) = await large.fork(1)
        for branch in (s1, s2, l1):
            await branch.extend(GREEDY)
        return usage, [b.model for b in (small, large, s1, l1)], [b.text for b in (s1, s2, l1)]

    usage, models, texts = asyncio.run(go())
    assert models == ["small", "large", "small", "large"]
    assert texts == ["small one", "small two", "large one"]
    assert usage.models["small"]["generated_tokens"] == 4 and usage.models["large"]["generated_tokens"] == 2
    assert usage.generated_tokens == 6 and usage.prompt_tokens == 2


def test_an_unknown_model_is_a_clear_error():
    with pytest.raises(PonderError, match="no model 'huge'.*small, large"):
        asyncio.run(two_models().open("q", model="huge"))


def test_appended_text_takes_the_place_of_script_tokens():
    engine = FakeEngine(["a b c d e"])

    async def go():
        root = await engine.open("q")
        await root.append("X Y ")  # two tokens of context: the script continues at its third token
        await root.extend(SamplingParams(max_tokens=1))
        (child,) = await root.fork(1)  # a fork continues at its parent's length
        await child.extend(GREEDY)
        return root, child

    root, child = asyncio.run(go())
    assert root.text == "X Y c "
    assert root.appended_tokens == 2 and root.usage.prompt_tokens == 1 + 2
    assert child.text == "X Y c d e" and child.finish_reason == "stop" and child.matched_stop is None


def test_top_logprobs_record_scripted_entropies_and_confidences():
    engine = FakeEngine([Script("a b c", entropies=[0.5, 2.0], confidences=[3.0])])

    async def go():
        (branch,) = await (await engine.open("q")).fork(1)
        return await branch.extend(SamplingParams(top_logprobs=20))

    branch = asyncio.run(go())
    assert branch.entropies == [0.5, 2.0, 0.0]  # the last one is the default
    assert branch.confidences == [3.0, 1.0, 1.0]


def test_score_asks_the_branchs_own_model():
    engine = two_models(score_fn=lambda context, continuation: -1.0 if "one" in context else -9.0)

    async def go():
        large = await engine.open("q", model="large")
        await large.append("one")
        small = await engine.open("q")
        return await large.score("yes"), await small.score("yes no")

    assert asyncio.run(go()) == (-1.0, pytest.approx(-0.2))
