"""The branches of one strategy run: one prompt, its forks, one ``Usage``, one token budget, one result.

Every sampling strategy does the same around its own logic -- open the prompt once, fork branches from it with
reproducible seeds, keep to the budget, cancel what is no longer needed, vote, report the full usage -- so that part
lives here, and a strategy reads as its algorithm::

    async with Pool(engine, question, seed=seed, budget=budget) as pool:
        await pool.sample(params, first=4, then=2, limit=16, until=LeaderStable(0.95))
        return pool.result("adaptive", config)

Branch ``i`` of a run (counting across ``sample`` calls) samples with seed ``seed + i``, so an early-stopping
strategy's first k branches are exactly self-consistency's first k: their accuracy and token counts compare directly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Sequence

from ..answers import vote
from ..engine.base import Branch, Engine, Message, PonderError, SamplingParams, StopIf, Usage
from ..prompts import math_messages
from ..result import BranchSummary, Result
from ..stopping import Rule, TokenBudget, first_of

# Branches that ended on their own vote; "halted" and "cancelled" ones were cut short and abstain.
ENDED_ON_THEIR_OWN = ("stop", "length")


def run_config(*, n: int, params: SamplingParams, seed: int | None, budget: int | None, **options) -> dict:
    """The ``Result.config`` of a run: its size, sampling parameters and strategy options."""
    sampling = {k: v for k, v in vars(params).items() if k != "seed"}
    return {"n": n, "seed": seed, "budget": budget, **sampling, **options}


class Pool:
    """``messages`` replaces the standard math prompt of ``question`` (e.g. a program-writing prompt); ``model`` opens
    it on another model of the engine (default: the engine's own); pools that pass the same ``usage`` share one
    account (and one budget count) -- a strategy that mixes prompts or models reports one usage."""

    def __init__(self, engine: Engine, question: str, *, seed: int | None, budget: int | None,
                 messages: Sequence[Message] | None = None, model: str | None = None, usage: Usage | None = None):
        self.engine = engine
        self.question = question
        self.messages = list(messages) if messages is not None else math_messages(question)
        self.model = model
        self.seed = seed
        self.usage = usage if usage is not None else Usage()
        self.budget = TokenBudget(budget, self.usage)
        self.branches: list[Branch] = []  # every branch forked, in creation order
        self.finished: list[Branch] = []  # the ones that ended on their own, in finishing order
        self.root: Branch | None = None
        self._start = time.perf_counter()

    async def __aenter__(self) -> Pool:
        self.root = await self.engine.open(self.messages, self.usage, model=self.model)
        return self

    async def __aexit__(self, *exc) -> None:
        for branch in [self.root, *self.branches]:
            branch.release()

    async def sample(self, params: SamplingParams, *, first: int, then: int = 0, limit: int | None = None,
                     stop_if: StopIf | None = None, until: Rule | None = None, keep: bool = False) -> list[Branch]:
        """Fork ``first`` branches from the prompt and extend them all concurrently.

        Each time every running branch has finished, ``then`` more start, up to ``limit`` in this call (default
        ``first``) and as far as the budget allows. ``stop_if`` halts a branch mid-decode. After each finish,
        ``until(all finished branches of the run)`` is asked; once it is settled, the running branches are cancelled
        (their tokens stay counted) and no more start. Branches that ended on their own are returned in finishing
        order; their KV cells are freed at once unless ``keep`` (then they live until the pool closes).
        """
        if first < 1:
            raise PonderError(f"a strategy needs at least one branch, got {first}")
        limit = first if limit is None else limit
        order: dict[asyncio.Task, int] = {}  # task -> branch index, to handle finishes of one step in a fixed order
        running: dict[asyncio.Task, Branch] = {}
        finished: list[Branch] = []
        halt = first_of(stop_if, self.budget if self.budget.limit is not None else None)

        async def start(k: int) -> None:
            room = self.budget.room()
            k = min(k, limit - len(order), k if room is None else room)
            if k < 1:
                return
            for branch in await self.root.fork(k):
                if not self.budget.reserve(branch):  # tokens generated while forking may have used the room
                    branch.release()
                    continue
                task = asyncio.create_task(branch.extend(self._seeded(params), halt))
                order[task] = len(self.branches)
                running[task] = branch
                self.branches.append(branch)

        try:
            await start(first)
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=order.__getitem__):
                    branch = running.pop(task)
                    self.budget.release(branch)
                    task.result()  # an engine error propagates (the finally below cancels the rest)
                    if branch.finish_reason in ENDED_ON_THEIR_OWN:
                        finished.append(branch)
                        self.finished.append(branch)
                    if not (keep and branch.finish_reason in ENDED_ON_THEIR_OWN):
                        branch.release()
                if until is not None and until(self.finished):
                    break
                if not running and then:
                    await start(then)
        finally:
            for branch in running.values():
                branch.release()  # a cancelled extend ends at the engine's next step
            await asyncio.gather(*running, return_exceptions=True)
            for branch in running.values():
                self.budget.release(branch)
        return finished

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        return replace(params, seed=None if self.seed is None else self.seed + len(self.branches))

    def result(self, strategy: str, config: dict, voters: Sequence[Branch] | None = None,
               weights: Sequence[float] | None = None) -> Result:
        """Vote on the answers of ``voters`` (default: every branch that ended on its own), weighted by ``weights``,
        and report every branch of the run with the full usage."""
        summaries = {b: BranchSummary.of(b) for b in self.branches}
        voters = self.finished if voters is None else voters
        ballot = vote([summaries[b].answer for b in voters], None if weights is None else list(weights))
        self.usage.wall_s = time.perf_counter() - self._start
        return Result.from_vote(ballot, list(summaries.values()), self.usage, self.engine.model, strategy, config)
