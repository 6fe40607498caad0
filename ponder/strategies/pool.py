"""The branches of one strategy run: one prompt, its forks, one ``Usage``, one token budget, one result.

Every sampling strategy does the same around its own logic -- open the prompt once, fork branches from it with
reproducible seeds, keep to the budget, cancel what is no longer needed, vote, report the full usage -- so that part
lives here, and a strategy reads as its algorithm::

    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt) as pool:
        await pool.sample(params, first=4, then=2, limit=16, until=LeaderStable(0.95))
        return pool.result("adaptive")

Branch ``i`` of a run (counting across ``sample`` calls) samples with seed ``seed + i``, so an early-stopping
strategy's first k branches are exactly self-consistency's first k: their accuracy and token counts compare directly.

``early_exit`` (a strategy option passed through to the pool) ends single branches early -- answer probes, the loop
cut; see ``ponder.stopping.EarlyExit`` -- for every branch the pool samples; the result's branch details say what it
did to each branch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Awaitable, Callable, Sequence

from ..answers import vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams, StopIf, Usage
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import BranchSummary, Result
from ..stopping import EarlyExit, Rule, TokenBudget, first_of

# Branches that ended on their own vote; "halted" and "cancelled" ones were cut short and abstain.
ENDED_ON_THEIR_OWN = ("stop", "length")


class Pool:
    """``prompt`` is the chat opened for ``question`` (the strategy's ``prompt`` argument, or a prompt of its own such
    as ``pal``'s program-writing one); ``model`` opens it on another model of the engine (default: the engine's own);
    pools that pass the same ``usage`` share one account -- a strategy that mixes prompts or models reports one
    usage. ``budget`` is a token count, or another pool's ``TokenBudget`` for pools that run at the same time: then
    they also share its usage and its reservations, so that together they never overshoot it. ``early_exit`` is the
    strategy option of that name (e.g. ``"probe+loop"``), applied to every branch."""

    def __init__(self, engine: Engine, question: str, *, seed: int | None, budget: int | TokenBudget | None,
                 prompt: MathPrompt = DEFAULT_PROMPT, model: str | None = None, usage: Usage | None = None,
                 early_exit: str | None = None):
        self.engine = engine
        self.early_exit = EarlyExit.parse(early_exit) if early_exit else None
        self.question = question
        self.messages = prompt.messages(question)
        self.model = model
        self.seed = seed
        if isinstance(budget, TokenBudget):
            if usage is not None and usage is not budget.usage:
                raise ValueError("a shared TokenBudget counts on its own usage; pass that usage or none")
            self.usage, self.budget = budget.usage, budget
        else:
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
                     stop_if: StopIf | None = None, until: Rule | None = None, keep: bool = False,
                     after_decode: Callable[[Branch], Awaitable[None]] | None = None) -> list[Branch]:
        """Fork ``first`` branches from the prompt and extend them all concurrently.

        Each time every running branch has finished, ``then`` more start, up to ``limit`` in this call (default
        ``first``) and as far as the budget allows. ``stop_if`` halts a branch mid-decode. After each finish,
        ``until(all finished branches of the run)`` is asked; once it is settled, the running branches are cancelled
        (their tokens stay counted) and no more start. Branches that ended on their own are returned in finishing
        order; their KV cells are freed at once unless ``keep`` (then they live until the pool closes).

        ``after_decode(branch)`` is work a branch needs before it can vote (running the program it wrote): it starts
        as soon as the branch has ended on its own, while the other branches decode, and the branch counts as
        finished -- for ``until``, for the next wave, in the returned list -- only once it is done. Work still under
        way when the outcome is settled is cancelled.
        """
        if first < 1:
            raise PonderError(f"a strategy needs at least one branch, got {first}")
        limit = first if limit is None else limit
        order: dict[asyncio.Task, int] = {}  # task -> branch index, to handle finishes of one step in a fixed order
        running: dict[asyncio.Task, Branch] = {}  # decoding
        working: dict[asyncio.Task, Branch] = {}  # decoded, in after_decode
        finished: list[Branch] = []
        started = 0
        halt = first_of(stop_if, self.budget if self.budget.limit is not None else None)

        async def start(k: int) -> None:
            nonlocal started
            room = self.budget.room()
            k = min(k, limit - started, k if room is None else room)
            if k < 1:
                return
            for branch in await self.root.fork(k):
                if not self.budget.reserve(branch):  # tokens generated while forking may have used the room
                    branch.release()
                    continue
                task = asyncio.create_task(self._extend(branch, self._seeded(params), halt))
                order[task] = len(self.branches)
                running[task] = branch
                self.branches.append(branch)
                started += 1

        def finish(branch: Branch) -> None:
            finished.append(branch)
            self.finished.append(branch)

        try:
            await start(first)
            while running or working:
                done, _ = await asyncio.wait([*running, *working], return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=order.__getitem__):
                    if task in working:
                        task.result()  # an error in after_decode propagates like an engine error
                        finish(working.pop(task))
                        continue
                    branch = running.pop(task)
                    self.budget.release(branch)
                    task.result()  # an engine error propagates (the finally below cancels the rest)
                    ended = branch.finish_reason in ENDED_ON_THEIR_OWN
                    if not (keep and ended):
                        branch.release()
                    if ended and after_decode is not None:
                        work = asyncio.create_task(after_decode(branch))
                        order[work] = order[task]
                        working[work] = branch
                    elif ended:
                        finish(branch)
                if until is not None and until(self.finished):
                    break
                if not running and not working and then:
                    await start(then)
        finally:
            for branch in running.values():
                branch.release()  # a cancelled extend ends at the engine's next step
            for work in working:
                work.cancel()
            await asyncio.gather(*running, *working, return_exceptions=True)
            for branch in running.values():
                self.budget.release(branch)
        return finished

    def _extend(self, branch: Branch, params: SamplingParams, halt: StopIf | None) -> Awaitable[Branch]:
        if self.early_exit is not None:
            return self.early_exit.extend(branch, params, halt)
        return branch.extend(params, halt)

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        return replace(params, seed=None if self.seed is None else self.seed + len(self.branches))

    def result(self, strategy: str, config: dict | None = None, voters: Sequence[Branch] | None = None,
               weights: Sequence[float] | None = None,
               summarize: Callable[[Branch], BranchSummary] = BranchSummary.of) -> Result:
        """Vote on the answers of ``voters`` (default: every branch that ended on its own), weighted by ``weights``,
        and report every branch of the run with the full usage. ``config`` is what the strategy changed or computed
        (the settings it really sampled with, a threshold it found); calling the strategy (``Strategy.__call__``)
        adds the run's arguments. ``summarize`` reads a branch for the report and the vote (default: the answer its
        text states)."""
        summaries = {b: self.summary(b, summarize) for b in self.branches}
        voters = self.finished if voters is None else voters
        ballot = vote([summaries[b].answer for b in voters], None if weights is None else list(weights))
        self.usage.wall_s = time.perf_counter() - self._start
        return Result.from_vote(ballot, list(summaries.values()), self.usage, self.engine.model, strategy,
                                dict(config or {}))

    def summary(self, branch: Branch, summarize: Callable[[Branch], BranchSummary] = BranchSummary.of) -> BranchSummary:
        """``summarize(branch)``, with what early exit did to the branch in its details (``early_exit``)."""
        summary = summarize(branch)
        exited = self.early_exit.details(branch) if self.early_exit is not None else None
        if exited is not None:
            summary.details = {**(summary.details or {}), "early_exit": exited}
        return summary
