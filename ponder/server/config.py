"""The settings of ``ponder serve``: defaults, the limits that protect it from hostile or broken clients, and checks.

Free of FastAPI and uvicorn (the server is an optional extra), so that ``ponder --help`` and the ``serve`` options'
defaults come from here without importing the server. docs/server.md ("Limits") says what each limit answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.base import PonderError
from ..strategies import get_strategy
from .schemas import MAX_N

MiB = 1 << 20
SERVE_STRATEGY = "auto"  # the strategy `ponder serve` runs for requests that name none, unless --strategy says


@dataclass
class ServerConfig:
    default_strategy: str = "sc"  # for an app built in code; `ponder serve` defaults to auto (SERVE_STRATEGY)
    default_n: int = 8
    api_key: str | None = None
    max_running: int = 16  # strategy runs at once; their branches share the engine's batch
    max_queue: int = 64  # requests waiting for a run slot; beyond that, 429
    # Hostile or broken clients (docs/server.md, "Limits").
    max_per_client: int = 32  # /v1/ requests in progress from one client address; beyond that, 429
    # Strategy runs one client address may throw away (disconnect, not read, prompt too long for the context): a token
    # bucket of client_burst, refilled at client_rate_per_min a minute (admission.StartLimit). Beyond it, 429.
    client_rate_per_min: float = 6.0
    client_burst: int = 8
    # A whole 32768-token context of English is about 130 KB of JSON; parsing a body costs the event loop time in
    # proportion to its size (see docs/server.md), which this bounds.
    max_body_bytes: int = MiB
    max_messages: int = 16  # a request holds one user message and a few system messages
    max_stop: int = 4  # stop strings, as OpenAI
    # Characters of the user message; None: as many as can fit in the engine's context (see create_app).
    max_prompt_chars: int | None = None
    header_timeout_s: float = 10.0  # to deliver a request's headers
    body_timeout_s: float = 30.0  # to deliver its body, once the headers are in
    send_timeout_s: float = 30.0  # to take (read) the answer, while the server has bytes waiting for the client

    def __post_init__(self) -> None:
        # Checked here, so that `ponder serve` fails on a bad option before it loads a model.
        get_strategy(self.default_strategy)
        if not 1 <= self.default_n <= MAX_N:
            raise PonderError(f"the default n must be between 1 and {MAX_N}, got {self.default_n}")
        if self.max_running < 1 or self.max_queue < 0:
            raise PonderError(f"need max_running >= 1 and max_queue >= 0, got {self.max_running} and "
                              f"{self.max_queue}")
        for name in ("max_per_client", "client_burst", "max_body_bytes", "max_messages", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PonderError(f"{name} must be at least 1, got {value}")
        if self.max_stop < 0:
            raise PonderError(f"max_stop must be 0 or more, got {self.max_stop}")
        for name in ("header_timeout_s", "body_timeout_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise PonderError(f"{name} must be more than 0 seconds, got {getattr(self, name):g}")
        if not self.client_rate_per_min > 0:
            raise PonderError(f"client_rate_per_min must be more than 0, got {self.client_rate_per_min:g}")
