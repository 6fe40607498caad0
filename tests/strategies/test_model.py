"""Every strategy on the bundled 0.5B (short runs): real branches end, cancel and free their KV cells as on the fake.

The question asks for a bare answer, so branches end on their own within a few tokens, at different lengths, and
early stopping has something to stop.
"""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import SamplingParams, Usage
from ponder.prompts import math_messages
from ponder.stopping import ConfidenceFloor
from ponder.strategies import SEARCHES, STRATEGIES

pytestmark = pytest.mark.model

QUESTION = "What is 2 + 3? Reply with only the boxed number."
PARAMS = SamplingParams(max_tokens=40)
OPTIONS = {  # settings small enough for a 40-token test
    "deepconf": {"window": 8, "warmup": 2},
    "short-m@k": {"m": 2},
    "bon": {"verifier": "self"},
}
# They also spend tokens that no reported branch holds (drafts, glimpses, rejected steps, pruned search nodes): count
# them per model.
OUTSIDE_BRANCHES = {"cascade", "specreason", "glimprouter", *SEARCHES}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_on_the_real_engine(real_engine, name):
    result = asyncio.run(STRATEGIES[name](real_engine, QUESTION, n=4, params=PARAMS, seed=0, budget=150,
                                          **OPTIONS.get(name, {})))
    assert result.usage.generated_tokens <= 150
    if name in OUTSIDE_BRANCHES:
        per_model = sum(counts.get("generated_tokens", 0) for counts in result.usage.models.values())
        assert per_model == result.usage.generated_tokens > 0
    else:
        assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches) > 0
    assert result.model.name == "qwen2.5-0.5b"
    stats = real_engine.stats()
    assert stats.live_branches == 0 and stats.kv_cells_used == 0  # every branch's KV cells were freed


def test_short_m_at_k_cancels_the_rest_on_the_real_engine(real_engine):
    result = asyncio.run(STRATEGIES["short-m@k"](real_engine, QUESTION, n=6, params=PARAMS, seed=0, m=2))
    reasons = [b.finish_reason for b in result.branches]
    assert reasons.count("stop") >= 2 and "cancelled" in reasons
    assert sum(result.votes.values()) <= 2
    assert real_engine.stats().kv_cells_used == 0


def test_confidence_floor_halts_a_real_branch_at_its_first_full_window(real_engine):
    async def go():
        usage = Usage()
        root = await real_engine.open(math_messages("Tom has 3 apples and buys 4 more. How many now?"), usage)
        (branch,) = await root.fork(1)
        root.release()
        # every window is below an infinite floor, so the branch halts as soon as it has one full window
        await branch.extend(SamplingParams(max_tokens=40, top_logprobs=20, seed=0), ConfidenceFloor(float("inf"), 5))
        tokens, reason, confidences = len(branch.tokens), branch.finish_reason, list(branch.confidences)
        branch.release()
        return tokens, reason, confidences

    tokens, reason, confidences = asyncio.run(go())
    assert (tokens, reason) == (5, "halted")
    assert len(confidences) == 5 and all(c > 0 for c in confidences)
    assert real_engine.stats().kv_cells_used == 0


def test_bon_with_the_same_model_as_judge(real_engine):
    result = asyncio.run(STRATEGIES["bon"](real_engine, QUESTION, n=3, params=PARAMS, seed=0, verifier="judge",
                                           judge="qwen2.5-0.5b"))
    assert len(result.votes) == 1 and 0.0 < next(iter(result.votes.values())) < 1.0  # the winner's P(Yes)
    assert result.usage.scored_tokens == 3 * 2  # one "Yes" and one "No" token per candidate
    assert result.usage.prompt_tokens > 4 * 30  # the question's prompt and three judge prompts
    assert real_engine.stats().kv_cells_used == 0


def test_answer_probes_stop_a_real_branch_and_count_their_tokens(real_engine):
    result = asyncio.run(STRATEGIES["sc"](real_engine, "What is 12 times 7? Think step by step.", n=2,
                                          params=SamplingParams(max_tokens=160), seed=0,
                                          early_exit="probe:every=16,window=2"))
    assert result.usage.probe_tokens > 0  # probes ran, on forks of the branches
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    stats = real_engine.stats()
    assert stats.live_branches == 0 and stats.kv_cells_used == 0  # every probe fork was released
