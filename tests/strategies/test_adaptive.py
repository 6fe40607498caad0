"""Adaptive-Consistency on the fake engine: stops after the first wave when all agree, keeps going while split."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.strategies import adaptive


def run(engine, **options):
    return asyncio.run(adaptive.STRATEGY(engine, "q", params=SamplingParams(), seed=0, **options))


def test_stops_after_the_first_wave_when_all_agree():
    engine = FakeEngine(["so \\boxed{7}", "it is \\boxed{7}"])
    result = run(engine, n=16)
    assert len(result.branches) == 4
    assert result.answer == "7"
    assert result.usage.generated_tokens == 2 * 2 + 2 * 3
    assert engine.stats().live_branches == 0


def test_keeps_sampling_while_the_vote_is_split():
    result = run(FakeEngine(["\\boxed{7}", "\\boxed{8}"]), n=16)
    assert len(result.branches) == 16  # never settles: runs to n
    assert result.votes == {"7": 8, "8": 8}


def test_adds_waves_until_the_leader_is_stable():
    # wave 1: 7 7 7 8 -> P = 0.81; wave 2: +7 7 -> 5:1, P = 0.94; wave 3: +7 7 -> 7:1, P = 0.98 >= 0.95: stop
    engine = FakeEngine(["\\boxed{7}"] * 3 + ["\\boxed{8}"] + ["\\boxed{7}"] * 20)
    result = run(engine, n=16, init=4, step=2)
    assert len(result.branches) == 8
    assert result.votes == {"7": 7, "8": 1}


def test_a_lower_threshold_stops_sooner():
    engine = FakeEngine(["\\boxed{7}"] * 3 + ["\\boxed{8}"] + ["\\boxed{7}"] * 20)
    assert len(run(engine, n=16, threshold=0.9).branches) == 6  # 5:1 -> 0.94 >= 0.9


def test_the_dirichlet_rule_is_selectable():
    result = run(FakeEngine(["\\boxed{7}"]), n=16, rule="dirichlet")
    assert len(result.branches) == 4
    assert result.config["rule"] == "dirichlet"


def test_a_settled_vote_cancels_the_branches_still_running():
    # two short agreeing branches settle a vote of init=5 before the long ones finish
    long = "a " * 40 + "\\boxed{9}"
    engine = FakeEngine(["\\boxed{7}"] * 4 + [long])
    result = run(engine, n=5, init=5)
    assert [b.finish_reason for b in result.branches] == ["stop"] * 4 + ["cancelled"]
    assert result.answer == "7"
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)


def test_bad_options_are_clear_errors():
    with pytest.raises(PonderError, match="threshold"):
        run(FakeEngine(["x"]), threshold=2)
    with pytest.raises(PonderError, match="step"):
        run(FakeEngine(["x"]), step=0)


def test_a_cut_off_branch_does_not_vote_with_its_last_number():
    # every branch is cut at 3 tokens in the middle of a computation: no answer, so nothing ever settles
    engine = FakeEngine(["so 3 + 4 = 7 and then more"])
    result = asyncio.run(adaptive.STRATEGY(engine, "q", n=8, params=SamplingParams(max_tokens=3), seed=0))
    assert len(result.branches) == 8 and result.votes == {}
