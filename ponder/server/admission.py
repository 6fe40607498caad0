"""A bounded queue in front of the engine: at most ``max_running`` strategy runs at once, ``max_queue`` more waiting.

Runs in progress all share the engine's batch; the bound keeps a burst of requests from holding unbounded memory and
answers the excess at once with 429 instead of letting it wait without limit.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from .schemas import RETRY_AFTER_S, ApiError


class Admission:
    def __init__(self, max_running: int, max_queue: int):
        self.max_running, self.max_queue = max_running, max_queue
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @asynccontextmanager
    async def slot(self):
        """Hold a run slot; raise a 429 ``ApiError`` at once when the queue is full."""
        if self.running + self.waiting >= self.max_running + self.max_queue:
            raise ApiError(429, f"the server is busy ({self.running} requests running, {self.waiting} queued); "
                                "retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
