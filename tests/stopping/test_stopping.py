"""The reusable stopping rules: token budget, confidence floor, first-m, leader stability, majority share."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams, Usage
from ponder.engine.fake import FakeEngine, Script
from ponder.stopping import (ConfidenceFloor, FirstM, LeaderStable, MajorityShare, TokenBudget, first_of,
                             group_confidences)


def finished(engine: FakeEngine, n: int):
    """``n`` branches of ``engine`` played to the end."""
    async def go():
        root = await engine.open("q")
        branches = await root.fork(n)
        await asyncio.gather(*(b.extend(SamplingParams()) for b in branches))
        return branches

    return asyncio.run(go())


@pytest.mark.parametrize("limit", [1, 7, 10, 23, 40])
def test_token_budget_is_never_exceeded_by_concurrent_branches(limit):
    engine = FakeEngine(["one two three four five six seven eight nine ten"])

    async def go():
        usage = Usage()
        budget = TokenBudget(limit, usage)
        root = await engine.open("q", usage)
        branches = [b for b in await root.fork(6) if budget.reserve(b)]
        await asyncio.gather(*(b.extend(SamplingParams(), budget) for b in branches))
        return usage, branches

    usage, branches = asyncio.run(go())
    assert usage.generated_tokens <= limit
    assert usage.generated_tokens == sum(len(b.tokens) for b in branches)
    if limit < 60:  # six branches of ten tokens do not fit: the budget, not the scripts, ended some
        assert any(b.finish_reason == "halted" for b in branches)


def test_token_budget_room_counts_reservations():
    usage = Usage(generated_tokens=5)
    budget = TokenBudget(8, usage)
    a, b, c, d = object(), object(), object(), object()
    assert [budget.reserve(x) for x in (a, b, c, d)] == [True, True, True, False]
    assert budget.room() == 0
    budget.release(a)
    assert budget.room() == 1
    assert TokenBudget(None, usage).room() is None


def test_token_budget_rejects_a_non_positive_limit():
    with pytest.raises(PonderError, match="budget"):
        TokenBudget(0, Usage())


def test_group_confidences_are_sliding_window_means():
    assert group_confidences([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]
    assert group_confidences([1, 2, 3], 5) == [2.0]  # shorter than a window: one group
    assert group_confidences([], 3) == []


def test_confidence_floor_halts_at_the_first_window_below_the_threshold():
    engine = FakeEngine([Script("a b c d e f g h i j", confidences=[5, 5, 5, 5, 5, 1, 1, 1, 1, 1])])

    async def go():
        root = await engine.open("q")
        (branch,) = await root.fork(1)
        return await branch.extend(SamplingParams(top_logprobs=5), ConfidenceFloor(threshold=4.0, window=4))

    branch = asyncio.run(go())
    # after token 6 the window is (5, 5, 5, 1): mean 4.0, not below; after token 7 it is (5, 5, 1, 1): mean 3.0
    assert branch.finish_reason == "halted"
    assert len(branch.tokens) == 7


def test_first_of_halts_when_any_rule_does():
    calls = []
    never = lambda b: calls.append(b) or False  # noqa: E731
    always = lambda b: True  # noqa: E731
    assert first_of(never, None, always)("x") is True
    assert first_of(never, None)("x") is False
    assert first_of(None, None) is None  # nothing can halt the branch: engines may batch it freely
    assert calls == ["x", "x"]


def test_first_m_counts_finished_branches():
    assert not FirstM(3)(["a", "b"])
    assert FirstM(3)(["a", "b", "c"])
    with pytest.raises(PonderError):
        FirstM(0)


@pytest.mark.parametrize("counts, expected", [
    ([4], 0.96875),  # Beta(5, 1): 1 - 0.5**5
    ([3], 0.9375),
    ([4, 1], 0.890625),  # Beta(5, 2)
    ([7, 1], 0.98046875),  # Beta(8, 2)
    ([3, 3], 0.5),
])
def test_beta_rule_is_exact(counts, expected):
    assert LeaderStable(method="beta").probability(counts) == pytest.approx(expected)


def test_dirichlet_rule_matches_beta_for_two_answers_and_is_stricter_with_more():
    beta, dirichlet = LeaderStable(method="beta"), LeaderStable(method="dirichlet")
    # one answer seen = that answer against the bucket of unseen ones: the same Beta(v1 + 1, 1)
    assert dirichlet.probability([4]) == pytest.approx(beta.probability([4]), abs=0.01)
    # a third contender can only lower the chance that the leader is the most frequent answer
    assert dirichlet.probability([6, 2, 2]) < beta.probability([6, 2])
    assert dirichlet.probability([6, 2, 2]) == dirichlet.probability([2, 6, 2])  # deterministic, order-free


def test_leader_stable_settles_on_four_agreeing_votes_not_three():
    rule = LeaderStable(0.95)
    assert rule(finished(FakeEngine(["\\boxed{7}"]), 4))
    assert not rule(finished(FakeEngine(["\\boxed{7}"]), 3))
    assert not rule(finished(FakeEngine(["\\boxed{7}", "\\boxed{8}"]), 6))
    assert not rule([])


def test_leader_stable_validates_its_settings():
    with pytest.raises(PonderError, match="threshold"):
        LeaderStable(1.0)
    with pytest.raises(PonderError, match="beta, dirichlet"):
        LeaderStable(method="bayes")


def test_majority_share_uses_the_weights():
    branches = finished(FakeEngine(["\\boxed{7}", "\\boxed{7}", "\\boxed{8}"]), 3)
    assert not MajorityShare(0.9)(branches)  # 2 of 3
    heavy_sevens = lambda b: 100.0 if "7" in b.text else 1.0  # noqa: E731
    assert MajorityShare(0.9, heavy_sevens)(branches)  # 200 of 201
    assert not MajorityShare(0.9, lambda b: 0.0)(branches)  # nothing voted


def test_majority_share_needs_two_voters():
    branches = finished(FakeEngine(["\\boxed{7}", "\\boxed{8}"]), 2)
    assert not MajorityShare(0.9)(branches[:1])  # one vote is 100 % of itself, and no consensus
    only_the_seven = lambda b: 1.0 if "7" in b.text else 0.0  # noqa: E731
    assert not MajorityShare(0.9, only_the_seven)(branches)
    assert MajorityShare(0.9)(finished(FakeEngine(["\\boxed{7}"]), 2))
