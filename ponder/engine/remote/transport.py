"""The transport under the remote engine: its OpenAI-compatible servers, which one a request goes to, retries,
servers set aside, hung servers found, and the probes of what each server honours.

Several base URLs: each request goes to the least-loaded server that is up (ties to the one that served the branch
before, whose prefix cache holds it). Connection errors, 429 and 5xx are retried, on another server at once if there
is one, else after an exponential backoff; a server that cannot be reached is skipped for ``DOWN_S`` seconds, and the
final error says which server failed and how. A 429, 502, 503 or 504 also sets the server aside for a while (its
``Retry-After``, else ``BUSY_S``) so that new requests go elsewhere first.

Faults during a stream are survived the same way. A stream that breaks (the server was killed, the connection
reset) or goes silent for ``stall_timeout`` seconds while the server does not answer a ping within ``PING_S`` (it
hangs: SIGSTOP, a wedged process; a server that is merely busy answers the ping and is waited for) is abandoned, the
server is set aside for ``DOWN_S``, and every branch it was extending resumes from the text it has so far, as a
request of its own for the tokens left, on another server if one is up (at most ``retries`` times per extend; the
engine resumes them, ``engine.py``). The
tokens streamed before the break stay counted once; what a dead server generated but never sent is not counted (it
never reached ponder). Non-streamed requests that hang are abandoned and retried the same way. A server that cannot
be reached when the engine starts is skipped (and tried again later) as long as one other server answers.

What a server honours is asked of it by small probe requests (``max_tokens=1``; the engine's own, not counted in any
request's usage). Only ``n`` is probed when the engine starts: dispatch needs it for the first request, and the probe
costs what one prompt evaluation costs. Logprobs and prompt logprobs with ``echo`` are probed the first time an
``extend`` asks for logprobs or a ``score`` is called, and then never again. Those two probes are the expensive ones:
llama-cpp-python's server sorts the whole vocabulary in Python for every token whose logprobs it returns (the echo
probe asks it for every prompt token), and probing everything at start-up cost a one-question ``ponder ask`` about
20 s in a trial, most of its wall time; most runs (``sc``, ``adaptive``, ``short-m@k`` with majority votes) never need
them. Remembering the answers on disk per URL was the alternative; it was not chosen because a server restarted with
another version behind the same URL would be described wrongly until the entry expired, and lazy probes leave
nothing to go stale.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import openai

from ..base import EngineStats, PonderError, PromptTooLongError, RemoteUnavailableError

DOWN_S = 10.0  # how long a server that failed to connect (or hung, or broke a stream) is skipped
BUSY_S = 5.0  # how long a server that answered 429/502/503/504 without Retry-After is skipped
STALL_S = 10.0  # silence of a server (no response, no chunk) after which ponder asks whether it is alive
PING_S = 5.0  # how long that question (GET /models) may take before the server counts as hung
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0  # retry waits: 0.5 s, 1 s, 2 s, ... at most 8 s (less up to 25 % jitter)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"  # a prompt whose every token is predictable
_CONTEXT_ERRORS = ("context length", "context window", "maximum context", "exceed_context", "too long")


@dataclass
class Server:
    url: str
    supports_n: bool
    # Probed on first need (see the module docstring): None until then.
    supports_logprobs: bool | None = None
    supports_echo_logprobs: bool | None = None  # prompt logprobs with echo, which score() needs
    in_flight: int = 0
    down_until: float = 0.0


@dataclass
class LoopClients:
    """asyncio objects belong to one event loop; callers that use ``asyncio.run`` per question get fresh ones."""

    loop: asyncio.AbstractEventLoop
    clients: dict[str, openai.AsyncOpenAI]
    slots: dict[str, asyncio.Semaphore]
    closer: asyncio.Task  # closes the clients when cancelled (see ``_close_when_cancelled``)
    probes: dict[str, asyncio.Task] = field(default_factory=dict)  # capability -> the probe of the servers


async def _close_when_cancelled(clients: list[openai.AsyncOpenAI]) -> None:
    """Wait until cancelled, then close ``clients`` in their own loop. ``asyncio.run`` cancels the tasks still
    pending when its coroutine returns and lets them finish before it closes the loop, so a question run with
    ``asyncio.run`` (``ponder.ask``) closes its connections there; a client left to the garbage collector would try
    to close them later from another loop, and log "Event loop is closed" tracebacks."""
    try:
        await asyncio.Event().wait()
    finally:
        for client in clients:
            await client.close()


class Transport:
    """The servers of one remote engine and the requests to them; see the module docstring. ``counters`` are the
    engine's: every request sent counts as one of its ``decode_steps``."""

    def __init__(self, base_urls: list[str], model: str | None, *, api_key: str | None, timeout: float, retries: int,
                 max_concurrency: int, stall_timeout: float, counters: EngineStats):
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self._timeout = openai.Timeout(timeout, connect=5.0)
        self.retries = retries
        self._stall_timeout = stall_timeout
        # What faults cost (benchmarks/robustness/bench_faults.py reads them): requests sent again, extends resumed
        # after a broken or hung stream, servers found hung by a ping.
        self.faults = {"retries": 0, "resumed": 0, "hung": 0}
        self._max_concurrency = max_concurrency
        urls = [_api_root(u) for u in base_urls]
        clients = {url: openai.OpenAI(base_url=url, api_key=self._api_key, max_retries=0, timeout=self._timeout)
                   for url in urls}
        listed, unreachable = {}, {}
        for url, client in clients.items():
            try:
                listed[url] = _model_ids(client, url)
            except RemoteUnavailableError as exc:
                unreachable[url] = exc
        if not listed:
            raise next(iter(unreachable.values()))
        first = next(iter(listed))
        served = model or _only_model(first, listed[first])
        # A server down at start is set aside and tried again later; n is not assumed of it (one request per branch).
        self.servers = [_probe_n(clients[url], url, listed[url], served) if url in listed
                         else Server(url=url, supports_n=False, down_until=time.monotonic() + DOWN_S)
                         for url in urls]
        for client in clients.values():
            client.close()
        self.n_everywhere = all(s.supports_n for s in self.servers)
        self.served = served
        self.urls = urls
        self._counters = counters
        self.waiting_requests = 0
        self._loop_clients: LoopClients | None = None

    def clients(self) -> LoopClients:
        loop = asyncio.get_running_loop()
        if self._loop_clients is None or self._loop_clients.loop is not loop:
            clients = {s.url: openai.AsyncOpenAI(base_url=s.url, api_key=self._api_key, timeout=self._timeout,
                                                 max_retries=0) for s in self.servers}  # see request
            self._loop_clients = LoopClients(
                loop=loop, clients=clients,
                slots={s.url: asyncio.Semaphore(self._max_concurrency) for s in self.servers},
                closer=loop.create_task(_close_when_cancelled(list(clients.values()))),
            )
        return self._loop_clients

    @asynccontextmanager
    async def request(self, hint: Server | None, **body):
        """Send ``body`` to ``/v1/completions`` on the least-loaded server that is up; yield (server, response).

        Connection errors, 429 and 5xx are retried up to ``retries`` times: at once on another server if one has not
        failed yet, else after an exponential backoff. The server's concurrency slot is held until the caller leaves
        the block (a stream is read inside it).
        """
        clients = self.clients()
        failed: set[str] = set()
        for attempt in range(self.retries + 1):
            server = self._pick(hint, failed)
            server.in_flight += 1
            try:
                async with self._slot(clients.slots[server.url]):
                    self._counters.decode_steps += 1
                    try:
                        response = await self.watch(server, clients.clients[server.url].completions.create(
                            model=self.served, **body))
                    except openai.APIConnectionError as exc:
                        self.set_down(server)
                        error = RemoteUnavailableError(f"cannot reach the OpenAI-compatible server at {server.url} "
                                                       f"({exc.__cause__ or exc}); is it running?")
                    except Stalled as exc:
                        self.set_down(server)
                        error = RemoteUnavailableError(str(exc))
                    except openai.APIStatusError as exc:
                        error = _status_error(server, exc, retried=attempt)
                        if not isinstance(error, RemoteUnavailableError):
                            limit = _n_limit(exc, body)
                            if limit is not None:  # llama-server takes n up to its slot count
                                raise TooManyChoices(limit) from None
                            raise error from None
                        if exc.status_code in (429, 502, 503, 504):  # busy or going away: new requests go elsewhere
                            server.down_until = time.monotonic() + _retry_after(exc)
                    else:
                        yield server, response
                        return
            finally:
                server.in_flight -= 1
            failed.add(server.url)
            if attempt == self.retries:
                raise error
            self.faults["retries"] += 1
            if len(failed) >= len(self.servers):  # every server has failed once: wait before the next round
                failed.clear()
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt) * random.uniform(0.75, 1.0))

    @asynccontextmanager
    async def _slot(self, slots: asyncio.Semaphore):
        self.waiting_requests += 1
        try:
            await slots.acquire()
        finally:
            self.waiting_requests -= 1
        try:
            yield
        finally:
            slots.release()

    @staticmethod
    def set_down(server: Server) -> None:
        """Skip ``server`` for ``DOWN_S``: it could not be reached, it hangs, or it broke a stream."""
        server.down_until = time.monotonic() + DOWN_S

    def _pick(self, hint: Server | None, failed: set[str]) -> Server:
        now = time.monotonic()
        untried = [s for s in self.servers if s.url not in failed] or self.servers
        candidates = [s for s in untried if s.down_until <= now] or untried
        return min(candidates, key=lambda s: (s.in_flight, s is not hint))

    async def supports(self, capability: str) -> bool:
        """Whether every server honours ``capability`` (a ``Server`` field probed on first need). Callers that ask
        at the same time share one probe; a probe that failed (a server down) is tried again by the next caller."""
        if any(getattr(s, capability) is None for s in self.servers):
            state = self.clients()
            probe = state.probes.get(capability)
            if probe is None or probe.done():
                probe = state.probes[capability] = asyncio.get_running_loop().create_task(
                    self._probe_servers(capability))
            await asyncio.shield(probe)  # one caller giving up does not cancel the others' probe
        return all(getattr(s, capability) for s in self.servers)

    async def _probe_servers(self, capability: str) -> None:
        probe, clients = _LAZY_PROBES[capability], self.clients().clients
        for server in self.servers:
            if getattr(server, capability) is None:
                setattr(server, capability, await probe(clients[server.url], server.url, self.served))

    async def watch(self, server: Server, awaitable):
        """Await ``awaitable`` (a request, or a stream's next chunk). If ``server`` sends nothing for
        ``stall_timeout`` seconds, ask it whether it is alive: one that does not answer within ``PING_S`` hangs, and
        ``Stalled`` is raised; a busy one (its slots full, a long prompt) is waited for."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=self._stall_timeout)
                if done:
                    return task.result()
                if not await self._alive(server):
                    self.faults["hung"] += 1
                    raise Stalled(f"{server.url} sent nothing for {self._stall_timeout:g} s and did not answer a "
                                  f"ping within {PING_S:g} s: it hangs")
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)

    async def _alive(self, server: Server) -> bool:
        client = self.clients().clients[server.url].with_options(timeout=PING_S, max_retries=0)
        try:
            await client.models.list()
        except openai.APIConnectionError:  # timeouts included
            return False
        except openai.APIStatusError:
            pass  # it answers, if not with the list
        return True

    def close(self) -> None:
        """Close this loop's clients (from outside their loop too, if it is not running)."""
        state, self._loop_clients = self._loop_clients, None
        if state is None or state.loop.is_closed():
            return
        state.closer.cancel()
        if not state.loop.is_running():
            state.loop.run_until_complete(asyncio.gather(state.closer, return_exceptions=True))


class Stalled(Exception):
    """A server went silent and did not answer a ping: it hangs (see ``Transport.watch``)."""


class TooManyChoices(Exception):
    """A server refused a request's ``n``; it takes at most ``limit`` choices per request."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} choices per request")
        self.limit = limit


def _n_limit(exc: openai.APIStatusError, body: dict) -> int | None:
    """If ``exc`` refuses ``body``'s ``n`` > 1 as too many choices, how many the server takes (the bound its message
    states, else half as many); None for any other refusal."""
    n = body.get("n", 1)
    message = _error_message(exc)
    if exc.status_code != 400 or n <= 1 or not re.search(r"'n'|\bn\b|n_cmpl", message):
        return None
    bound = re.search(r"<=\s*(\d+)\s*,", message) or re.search(r"(?:at most|maximum(?: of)?)\s*(\d+)", message)
    limit = int(bound.group(1)) if bound else n // 2
    return max(1, min(limit, n - 1))


END = object()


async def next_chunk(chunks):
    """The next chunk of a stream, or ``END`` (a task cannot end with StopAsyncIteration's kin cleanly)."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return END


def _retrieve(task: asyncio.Task) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _retry_after(exc: openai.APIStatusError) -> float:
    try:
        return min(max(float(exc.response.headers.get("retry-after", "")), 0.5), 60.0)
    except ValueError:
        return BUSY_S


def usage_of(completion, server: Server):
    if completion.usage is None:
        raise PonderError(f"{server.url} reports no token usage; ponder needs it to count tokens honestly")
    return completion.usage


@dataclass(frozen=True)
class TokenLogprobs:
    """A choice's tokens (their texts), their log-probabilities and each one's top alternatives (text -> logprob)."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float]]  # one per token; empty when no alternatives were asked for


def token_logprobs_of(logprobs) -> TokenLogprobs | None:
    """A choice's ``logprobs`` in either shape servers answer ``/v1/completions`` with: the completions API's own
    (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts: vLLM, SGLang, llama-cpp-python) or the chat API's
    (``content``, a list of ``{token, logprob, top_logprobs: [{token, logprob}]}``: llama.cpp's ``llama-server``).
    None when the choice carries none."""
    if logprobs is None:
        return None
    if logprobs.tokens:
        tokens = list(logprobs.tokens)
        values = list(logprobs.token_logprobs or [None] * len(tokens))
        return TokenLogprobs(tokens, values, [dict(t or {}) for t in logprobs.top_logprobs or []])
    content = (logprobs.model_extra or {}).get("content")
    if not content:
        return None
    top = [{alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or []} for entry in content]
    return TokenLogprobs([entry["token"] for entry in content], [entry.get("logprob") for entry in content],
                         top if any(top) else [])


def _status_error(server: Server, exc: openai.APIStatusError, retried: int) -> PonderError:
    """A refusal as a ponder error; 429 and 5xx are ``RemoteUnavailableError`` (worth retrying)."""
    message = _error_message(exc)
    if exc.status_code in (400, 413) and any(marker in message.lower() for marker in _CONTEXT_ERRORS):
        return PromptTooLongError(f"{server.url}: {message}")
    if exc.status_code == 429 or exc.status_code >= 500:
        return RemoteUnavailableError(f"{server.url} answered {exc.status_code} (after {retried} retries): {message}")
    return PonderError(f"{server.url} refused the request ({exc.status_code}): {message}")


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return exc.message


def _api_root(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is taken as given."""
    url = url.rstrip("/")
    if not urlsplit(url).scheme:
        raise PonderError(f"base URL {url!r} needs a scheme, e.g. http://{url}/v1")
    return url if urlsplit(url).path else url + "/v1"


def _model_ids(client: openai.OpenAI, url: str) -> list[str]:
    try:
        return [m.id for m in client.models.list()]
    except openai.APIConnectionError as exc:
        raise RemoteUnavailableError(f"cannot reach the OpenAI-compatible server at {url} "
                                     f"({exc.__cause__ or exc}); is it running?") from None
    except openai.APIStatusError as exc:
        raise PonderError(f"{url}/models answered {exc.status_code}: {_error_message(exc)}") from None


def _only_model(url: str, models: list[str]) -> str:
    if len(models) != 1:
        raise PonderError(f"{url} serves {len(models)} models ({', '.join(models) or 'none'}); choose one with --model")
    return models[0]


def _probe_n(client: openai.OpenAI, url: str, models: list[str], served: str) -> Server:
    """The server, once it is known to serve ``served`` and whether it honours ``n`` > 1 (llama.cpp's servers ignore
    or reject it). The other capabilities are probed on first need (``_LAZY_PROBES``)."""
    if served not in models:
        raise PonderError(f"{url} does not serve {served!r}; it serves: {', '.join(models) or 'nothing'}")
    try:  # temperature 1: some servers refuse n > 1 with greedy sampling
        with_n = client.completions.create(model=served, prompt="1+1=", max_tokens=1, temperature=1.0, n=2)
    except openai.APIStatusError:
        return Server(url=url, supports_n=False)
    return Server(url=url, supports_n=len(with_n.choices) == 2)


async def _probe_answer(client: openai.AsyncOpenAI, url: str, served: str, prompt: str,
                        **extra) -> openai.types.Completion | None:
    """A one-token greedy completion of ``prompt``, or None when the server refuses the request."""
    try:
        return await client.completions.create(model=served, prompt=prompt, max_tokens=1, temperature=0.0, **extra)
    except openai.APIStatusError:
        return None
    except openai.APIConnectionError as exc:
        raise RemoteUnavailableError(f"cannot reach the OpenAI-compatible server at {url} "
                                     f"({exc.__cause__ or exc}); is it running?") from None


async def _probe_logprobs(client: openai.AsyncOpenAI, url: str, served: str) -> bool:
    """Does the server return the logprobs of generated tokens?"""
    answer = await _probe_answer(client, url, served, "1+1=", logprobs=1)
    entries = token_logprobs_of(answer.choices[0].logprobs) if answer is not None else None
    return entries is not None and any(lp is not None for lp in entries.logprobs)


async def _probe_echo_logprobs(client: openai.AsyncOpenAI, url: str, served: str) -> bool:
    """Does it return prompt logprobs with ``echo`` that belong to the right tokens (llama-cpp-python 0.3's are
    shifted by one position)?"""
    echoed = await _probe_answer(client, url, served, COUNTING, echo=True, logprobs=1)
    return echoed is not None and _echo_aligned(token_logprobs_of(echoed.choices[0].logprobs))


_LAZY_PROBES = {"supports_logprobs": _probe_logprobs, "supports_echo_logprobs": _probe_echo_logprobs}


def _echo_aligned(entries: TokenLogprobs | None) -> bool:
    """In a counting prompt nearly every token is the model's top guess: if the top alternatives listed at position i
    match token i, the prompt logprobs are aligned; if they match token i+1, every entry is off by one position."""
    if entries is None or not entries.tokens or not entries.top:
        return False
    tokens = entries.tokens
    guesses = [max(top, key=top.get) if top else None for top in entries.top]
    aligned = sum(guesses[i] == tokens[i] for i in range(1, len(tokens)))
    off_by_one = sum(guesses[i] == tokens[i + 1] for i in range(1, len(tokens) - 1))
    return aligned > off_by_one
