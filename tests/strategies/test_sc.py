"""Self-consistency and greedy on the fake engine, with each vote weighting."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, Script
from ponder.strategies import greedy, sc
from ponder.strategies.weights import rpc


def run_sc(engine, n, **options):
    return asyncio.run(sc.STRATEGY(engine, "q", n=n, params=SamplingParams(), seed=0, **options))


def test_majority_vote():
    result = run_sc(FakeEngine(["\\boxed{1}", "\\boxed{1}", "\\boxed{2}"]), 3)
    assert result.answer == "1"
    assert result.votes == {"1": 2, "2": 1}
    assert result.config["weighting"] == "majority"


def test_logprob_weighting_prefers_the_likely_paths():
    engine = FakeEngine([Script("a \\boxed{1}", logprobs=[-3, -3]), Script("b \\boxed{1}", logprobs=[-3, -3]),
                         Script("c \\boxed{2}", logprobs=[-0.01, -0.01])])
    assert run_sc(engine, 3).answer == "1"
    result = run_sc(FakeEngine(engine.scripts), 3, weighting="logprob")
    assert result.answer == "2"
    assert result.votes == pytest.approx({"1": 2 * np.exp(-3), "2": np.exp(-0.01)})
    assert result.config["logprobs"] is True  # the weighting switched the logprobs on


def test_self_certainty_weighting_uses_mean_token_confidence():
    engine = FakeEngine([Script("a \\boxed{1}", confidences=[1, 1]), Script("b \\boxed{1}", confidences=[1, 2]),
                         Script("c \\boxed{2}", confidences=[4, 4])])
    result = run_sc(engine, 3, weighting="self-certainty")
    assert result.votes == pytest.approx({"1": 1.0 + 1.5, "2": 4.0})
    assert result.answer == "2"


def test_rpc_counts_identical_paths_once():
    # two copies of one path against one other, a little more likely path (too few paths to prune any)
    same = Script("x \\boxed{1}", logprobs=[-0.5, -0.5])
    engine = FakeEngine([same, same, Script("y \\boxed{2}", logprobs=[-0.3] * 2)])
    assert run_sc(engine, 3).answer == "1"
    result = run_sc(FakeEngine(engine.scripts), 3, weighting="rpc")
    assert result.votes == pytest.approx({"1": np.exp(-0.5), "2": np.exp(-0.3)})
    assert result.answer == "2"


def test_rpc_prunes_the_low_probability_cluster():
    class Path:
        def __init__(self, text, p):
            self.text, self.mean_logprob = text, float(np.log(p))

    likely = [Path(f"likely {i}", p) for i, p in enumerate([0.9, 0.88, 0.91, 0.87, 0.89])]
    unlikely = [Path(f"unlikely {i}", p) for i, p in enumerate([0.5, 0.45, 0.3])]
    weights = rpc(likely + unlikely)
    assert weights[:5] == pytest.approx([0.9, 0.88, 0.91, 0.87, 0.89])
    assert weights[5:] == [0.0, 0.0, 0.0]


def test_unknown_weighting_is_a_clear_error():
    with pytest.raises(PonderError, match="majority, logprob, self-certainty, rpc"):
        run_sc(FakeEngine(["x"]), 2, weighting="loudest")


def test_seeds_follow_the_branch_index():
    seen = []

    class SeedLog(FakeEngine):
        async def extend(self, branch, params, stop_if=None):
            seen.append(params.seed)
            return await super().extend(branch, params, stop_if)

    asyncio.run(sc.STRATEGY(SeedLog(["\\boxed{1}"]), "q", n=3, params=SamplingParams(), seed=10))
    assert seen == [10, 11, 12]


def test_greedy_runs_one_branch_at_temperature_zero():
    result = asyncio.run(greedy.STRATEGY(FakeEngine(["\\boxed{3}"]), "q", n=8, params=SamplingParams(), seed=1))
    assert len(result.branches) == 1
    assert result.config["temperature"] == 0.0
    assert result.answer == "3"
