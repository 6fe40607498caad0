"""Running a model's program in the sandbox (``sandbox.run_python``), one program per core at a time across the
process (``run_program``)."""

from __future__ import annotations

import asyncio
import os
import time
import weakref

from ..engine.base import Usage
from .sandbox import Limits, Outcome, run_python

_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def sandbox_slots() -> asyncio.Semaphore:
    """One sandbox run per core at a time, shared by every run in this process (a server runs many requests at once).
    asyncio's primitives belong to the event loop they are used on, hence one semaphore per loop."""
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        _SLOTS[loop] = asyncio.Semaphore(os.cpu_count() or 1)
    return _SLOTS[loop]


async def run_program(program: str, limits: Limits, usage: Usage | None = None) -> tuple[Outcome, float]:
    """Run ``program`` in the sandbox once a slot is free; returns its outcome and the seconds it ran, which are also
    added to ``usage``'s ``sandbox`` stage when given (a run cancelled midway took time too)."""
    async with sandbox_slots():
        start = time.perf_counter()
        try:
            outcome = await run_python(program, limits)
        finally:
            seconds = time.perf_counter() - start
            if usage is not None:
                usage.add_stage("sandbox", seconds)
    return outcome, seconds
