"""Who may start a strategy run: a bounded queue in front of the engine, and a per-client limit on runs started.

``Admission``: at most ``max_running`` strategy runs at once, ``max_queue`` more waiting. Runs in progress all share
the engine's batch; the bound keeps a burst of requests from holding unbounded memory and answers the excess at once
with 429 instead of letting it wait without limit.

``StartLimit``: a token bucket per client address, spent by the strategy runs a client throws away: it disconnects
before the answer, stops reading it (and is dropped), or sends a prompt too long for the context. Each of those cost
the engine work that nobody receives, and a client that loops on them (the hostile-load benchmark's "disconnect"
client) would otherwise keep branches decoding beside everyone else's. A client with no token left is refused before
its run starts. A client that reads its answers never spends one, however fast it asks and however many it has in
progress at once (that is ``ClientCap``'s bound, guards.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

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


FORGET_AT_LEAST = 1024  # buckets kept before full ones are dropped


@dataclass
class _Bucket:
    tokens: float
    updated: float  # time.monotonic() when ``tokens`` was last brought up to date


class StartLimit:
    """Per client: ``burst`` runs thrown away, refilled at ``rate_per_min`` a minute. Runs thrown away at the same time
    may take a bucket below zero: the client then waits for all of them."""

    def __init__(self, rate_per_min: float, burst: int, clock=time.monotonic):
        self.rate_per_s, self.burst, self.clock = rate_per_min / 60, burst, clock
        self._buckets: dict[str, _Bucket] = {}
        self._forget_at = FORGET_AT_LEAST

    def check(self, client: str) -> None:
        """Raise a 429 ``ApiError`` with ``Retry-After`` if ``client`` has no token left."""
        bucket = self._refilled(client)
        if bucket.tokens < 1:
            wait_s = math.ceil((1 - bucket.tokens) / self.rate_per_s)
            raise ApiError(429, "this client has thrown away too many runs (disconnected before the answer, stopped "
                                f"reading it, or sent prompts too long for the context); retry in {wait_s} s",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(wait_s)})

    def spend(self, client: str) -> None:
        """Count a run ``client`` threw away."""
        self._refilled(client).tokens -= 1

    def _refilled(self, client: str) -> _Bucket:
        now = self.clock()
        self._forget_full_buckets(now)
        bucket = self._buckets.setdefault(client, _Bucket(self.burst, now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        return bucket

    def _forget_full_buckets(self, now: float) -> None:
        # A full bucket is the same as none: dropping them keeps the table as small as the set of recent wasters,
        # however many addresses have ever connected. Done each time the table has doubled, so that it costs O(1)
        # per request on average even when many addresses are wasting at once.
        if len(self._buckets) < self._forget_at:
            return
        self._buckets = {client: b for client, b in self._buckets.items()
                         if b.tokens + (now - b.updated) * self.rate_per_s < self.burst}
        self._forget_at = max(FORGET_AT_LEAST, 2 * len(self._buckets))
