"""The frame of a run on two models of one engine, a small and a large one (``cascade``, ``specreason``,
``glimprouter``): ``TwoModelRun``.

What those strategies share around their own logic: one ``Usage`` for both models (``usage.models`` holds each
model's tokens; a token budget caps both together), the question's prompt opened on either model, every branch the
run opens or forks released when it ends, and the result timed from the run's start::

    async with TwoModelRun(engine, question, prompt=prompt) as run:
        drafter = await run.open(small)
        ...
        return run.result("specreason", vote([solution.answer]), [solution])
"""

from __future__ import annotations

import time

from ..answers import Vote
from ..engine.base import Branch, Engine, Usage
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import BranchSummary, Result
from ..stopping import TokenBudget
from .pool import Pool


class TwoModelRun:
    def __init__(self, engine: Engine, question: str, *, prompt: MathPrompt = DEFAULT_PROMPT):
        self.engine = engine
        self.question = question
        self.prompt = prompt
        self.usage = Usage()
        self._branches: list[Branch] = []  # every branch the run opened or forked, released at the end
        self._start = time.perf_counter()

    async def __aenter__(self) -> TwoModelRun:
        return self

    async def __aexit__(self, *exc) -> None:
        for branch in self._branches:
            branch.release()

    async def open(self, model: str) -> Branch:
        """The question's prompt, opened on ``model``."""
        return self.track(await self.engine.open(self.prompt.messages(self.question), self.usage, model=model))

    def track(self, branch: Branch) -> Branch:
        """``branch`` (a fork the run made), to be released when the run ends."""
        self._branches.append(branch)
        return branch

    def pool(self, model: str, *, seed: int | None, budget: int | TokenBudget | None,
             early_exit: str | None = None) -> Pool:
        """A pool of branches of the question on ``model``, counted on the run's usage."""
        return Pool(self.engine, self.question, seed=seed, budget=budget, prompt=self.prompt, model=model,
                    usage=self.usage, early_exit=early_exit)

    def result(self, strategy: str, vote: Vote, branches: list[BranchSummary]) -> Result:
        """The run's result: ``vote`` decides, ``branches`` are reported, with the usage of both models."""
        self.usage.wall_s = time.perf_counter() - self._start
        return Result.from_vote(vote, branches, self.usage, self.engine.model, strategy, {})
