"""The in-process engine's scheduler: every model's steps, one at a time, on the one worker thread.

One asyncio task (``_run``) plans the steps of every loaded model in turn; the decodes and the sampling run on one
worker thread, so two models never decode at the same time (two llama.cpp thread pools on the same cores slow both
down manyfold) and the event loop stays free. The task exits whenever there is nothing to do; ``kick`` starts it
again.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..base import EngineError, PonderError
from .jobs import StepPlan
from .runner import ModelRunner


class Scheduler:
    """Runs the steps of the runners ``runners()`` returns (each loaded model once) on ``executor``, its one worker
    thread. Jobs that wait for KV room nobody releases fail after ``stall_timeout_s`` seconds."""

    def __init__(self, runners: Callable[[], list[ModelRunner]], stall_timeout_s: float):
        self._runners = runners
        self.stall_timeout_s = stall_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponder-decode")
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None

    def new_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def kick(self) -> None:
        """Make sure the scheduling task runs (it exits whenever there is nothing to do)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        while True:
            runners = self._runners()
            for runner in runners:
                runner.admit()
            busy = [r for r in runners if r.busy]
            if not busy:
                if not any(r.blocked for r in runners):
                    return
                # Waiting jobs need room that only a release can make. If none comes, every cell is held by idle
                # branches that their owner waits to release until these jobs finish: fail loudly, do not hang.
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.stall_timeout_s)
                except TimeoutError:
                    for r in runners:
                        r.fail_waiting(PonderError(
                            f"the KV cache is full ({r.model.name}: {r.cells_used} of {r.n_ctx} cells held by "
                            f"branches that are not generating) and nothing was released for "
                            f"{self.stall_timeout_s:g} s: release finished branches, lower max_tokens or the number "
                            f"of branches, or raise n_ctx"))
                continue
            for runner in busy:  # one step of each model in turn: their batches interleave on the one worker
                plan = runner.plan()
                step = loop.run_in_executor(self.executor, runner.step, plan)
                try:
                    # shield: if this task is cancelled the worker still finishes its decode before the next one
                    out = await asyncio.shield(step)
                except asyncio.CancelledError:
                    await self._cancelled(runner, plan, step)
                    raise
                except Exception as exc:  # the jobs' futures carry the error to their callers
                    self._fail_all(exc if isinstance(exc, EngineError) else EngineError(f"decode failed: {exc!r}"))
                    return
                runner.apply(plan, out)

    async def _cancelled(self, runner: ModelRunner, plan: StepPlan, step: asyncio.Future) -> None:
        """The scheduling task was cancelled, most often because ``asyncio.run`` ends while a last step (the KV
        operations of a release) is on the worker. Let that step finish, so that the KV cache is in a known state, and
        fail only the jobs still in flight: the prefix cache stays for the engine's next event loop."""
        try:
            runner.apply(plan, await step)
        except Exception as exc:
            self._fail_all(EngineError(f"decode failed: {exc!r}"))
            return
        if any(r.in_flight for r in self._runners()):
            self._fail_all(EngineError("the engine loop was cancelled"))

    def _fail_all(self, exc: BaseException) -> None:
        for runner in self._runners():
            runner.fail_all(exc)
