"""Join rules (``Rule``: ``rule(finished) -> bool``): they look at the branches that have finished so far and say
whether the outcome is settled, so that no more branches need to run and the running ones can be cancelled: ``FirstM``
(short-m@k), ``LeaderStable`` (Adaptive-Consistency's Beta/Dirichlet rule) and ``MajorityShare`` (DeepConf's
consensus). ``ballot`` is the vote of a set of branches they (and strategies) read."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.special import betainc

from ..answers import vote
from ..engine.base import Branch, PonderError
from ..result import BranchSummary

Rule = Callable[[Sequence[Branch]], bool]
Weigh = Callable[[Branch], float]
Answer = Callable[[Branch], str | None]  # how a join rule reads a branch's answer


def stated_answer(branch: Branch) -> str | None:
    """The answer a branch's text states, read as the result reports it."""
    return BranchSummary.of(branch).answer


def ballot(branches: Sequence[Branch], weigh: Weigh | None = None, answer: Answer = stated_answer):
    """The vote of ``branches`` on their answers (``answer(branch)``; default: stated in the text), each weighted by
    ``weigh`` (1 by default)."""
    return vote([answer(b) for b in branches], None if weigh is None else [weigh(b) for b in branches])


class FirstM:
    """Settled once ``m`` branches have finished (short-m@k; m = 1 is first-finish)."""

    def __init__(self, m: int):
        if m < 1:
            raise PonderError(f"m must be at least 1, got {m}")
        self.m = m

    def __call__(self, finished: Sequence[Branch]) -> bool:
        return len(finished) >= self.m


class LeaderStable:
    """Adaptive-Consistency (Aggarwal et al., 2023): settled when, under a uniform prior on the answers' frequencies,
    the answer leading the vote is the most frequent one with probability >= ``threshold``.

    * ``beta``: the two leading answers with counts v1 >= v2 -- P(p1 > p2) where p1 / (p1 + p2) ~ Beta(v1 + 1, v2 + 1),
      computed exactly. With one answer seen, v2 = 0: four agreeing votes give 0.969, three give 0.938.
    * ``dirichlet``: every answer seen plus one bucket for answers not seen yet, frequencies ~ Dirichlet(counts + 1);
      P(the leader has the largest frequency) by Monte Carlo with a fixed seed (so the rule is deterministic).

    ``answer`` reads each branch's vote (default: the answer its text states; a program-aided strategy passes the
    value the branch's program printed).
    """

    METHODS = ("beta", "dirichlet")
    DIRICHLET_SAMPLES = 20_000

    def __init__(self, threshold: float = 0.95, method: str = "beta", answer: Answer = stated_answer):
        if not 0.5 < threshold < 1.0:
            raise PonderError(f"threshold must be between 0.5 and 1 (exclusive), got {threshold}")
        if method not in self.METHODS:
            raise PonderError(f"unknown stopping rule {method!r}; choose one of: {', '.join(self.METHODS)}")
        self.threshold = threshold
        self.method = method
        self.answer = answer

    def probability(self, counts: Sequence[float]) -> float:
        """P(the answer with the largest count is the most frequent one); ``counts`` in any order, at least one."""
        ranked = sorted(counts, reverse=True) + [0.0]  # the zero is the bucket of answers not seen yet
        if self.method == "beta":  # P(X > 1/2) for X ~ Beta(a, b) is the regularised I_{1/2}(b, a)
            return float(betainc(ranked[1] + 1, ranked[0] + 1, 0.5))
        draws = np.random.default_rng(0).dirichlet(np.asarray(ranked) + 1.0, self.DIRICHLET_SAMPLES)
        return float(np.mean(draws.argmax(axis=1) == 0))

    def __call__(self, finished: Sequence[Branch]) -> bool:
        counts = list(ballot(finished, answer=self.answer).groups.values())
        return bool(counts) and self.probability(counts) >= self.threshold


class MajorityShare:
    """DeepConf's consensus: settled when the leading answer holds at least ``share`` of the (weighted) vote.

    Branches of weight 0 do not vote, and a single vote is no consensus: it takes at least two voters.
    """

    def __init__(self, share: float = 0.95, weigh: Weigh | None = None):
        if not 0.5 < share <= 1.0:
            raise PonderError(f"consensus share must be in (0.5, 1], got {share}")
        self.share = share
        self.weigh = weigh

    def __call__(self, finished: Sequence[Branch]) -> bool:
        voters = [b for b in finished if self.weigh is None or self.weigh(b) > 0]
        tally = ballot(voters, self.weigh)
        counted = sum(len(members) for members in tally.members.values())  # voters that stated an answer
        return counted >= 2 and tally.groups[tally.winner] / tally.total >= self.share
