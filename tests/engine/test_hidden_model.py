"""Hidden states from the real engine (bundled 0.5B): the vector an extend keeps for free equals a separate
evaluation of the same tokens, and reading one costs what ``Usage`` says."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ponder.engine import SamplingParams, Usage
from ponder.prompts import math_messages

pytestmark = pytest.mark.model

QUESTION = "What is 12 times 7? Answer in one short sentence."


def close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return cosine > 0.999 and np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_free_hidden_state_matches_a_separate_evaluation(real_engine):
    async def go():
        usage = Usage()
        root = await real_engine.open(math_messages(QUESTION), usage)
        (branch,) = await root.fork(1)
        await branch.extend(SamplingParams(temperature=0.0, max_tokens=48, hidden=True))
        scored = usage.scored_tokens
        free = await branch.hidden()
        cost = usage.scored_tokens - scored
        # the same tokens again, from a fresh prompt: evaluated as appended text, then read
        (again,) = await root.fork(1)
        again.tokens, again.text = [], ""
        await again.append(branch.text)
        separate = await again.hidden()
        for b in (root, branch, again):
            b.release()
        return branch.finish_reason, free, cost, separate, usage

    reason, free, cost, separate, usage = asyncio.run(go())
    assert reason == "stop" and cost == 0  # ended at end-of-generation: the decode had computed it
    assert free.shape == (real_engine._default.n_embd,) and free.dtype == np.float32
    assert close(free, separate)
    assert usage.hidden_states == 2 and usage.models["qwen2.5-0.5b"]["hidden_states"] == 2


def test_hidden_state_after_a_stop_costs_one_token_and_matches(real_engine):
    async def go():
        usage = Usage()
        root = await real_engine.open(math_messages(QUESTION), usage)
        a, b = await root.fork(2)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        await a.extend(params)  # without hidden=True: the vector is read afterwards
        await b.extend(SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, hidden=True))
        before = usage.scored_tokens
        va, vb = await a.hidden(), await b.hidden()
        cost = usage.scored_tokens - before
        again = await a.hidden()  # now current: free
        for x in (root, a, b):
            x.release()
        return a.tokens == b.tokens, va, vb, again, cost, usage.scored_tokens - before

    same, va, vb, again, cost, total = asyncio.run(go())
    assert same and cost == 2 and total == 2  # "length": the last token was not in the KV cells yet
    assert close(va, vb) and np.array_equal(va, again)


def test_shipped_probe_of_the_bundled_model_verifies_for_bon(real_engine):
    from ponder.probes import probe_for
    from ponder.strategies import STRATEGIES

    probe = probe_for(real_engine.model)  # shipped in the package, matched by the GGUF's sha256
    assert probe.hidden_size == real_engine._default.n_embd
    result = asyncio.run(STRATEGIES["bon"](real_engine, "What is 2 + 3?", n=2, verifier="probe", seed=0,
                                           params=SamplingParams(max_tokens=48)))
    assert all(0.0 <= score <= 1.0 for score in result.votes.values())  # best-of-N's vote: the chosen one's score
    # candidates that ended at end-of-generation were read for free; the others cost one token each
    assert result.usage.scored_tokens <= 2 and result.usage.hidden_states == 2
