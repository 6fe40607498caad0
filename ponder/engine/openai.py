"""The Branch API over any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, llama-cpp-python's server.

A remote branch is a text prefix: the prompt (rendered here with a chat template, by the same Jinja renderer the
in-process engine uses) plus everything the branch has generated. Each operation maps onto ``/v1/completions``:

* ``open`` sends the prompt with ``max_tokens=1``: the server evaluates it once (and keeps it in its prefix cache),
  reports its token count, and a prompt that does not fit fails here, as on the in-process engine.
* ``append`` sends nothing: it adds the text to the branch's prefix and leaves it *uncounted*. The branch's next
  request that reports a prompt count counts it -- the server's prompt count minus the branch's context (minus a
  scored continuation) is the number of tokens appended. Requests sent whole (``score``, short plain extends: see
  ``extend``) report it; a streamed extend cannot be relied on to (llama-cpp-python's server streams no usage, and a
  stream closed early never gets to it), so before one starts, and before a fork copies the branch, an uncounted
  append is counted by a request of its own as ``open`` counts a prompt (``max_tokens=1``). Counting an append on the
  request that needs its text anyway saves one evaluation of the whole prefix per append for a verifier's question
  or an answer probe: on llama-cpp-python's server, whose single context the branches' requests take turns in, a
  re-sent prefix is mostly evaluated again. Until then the branch's ``tokens``, ``appended_tokens`` and
  ``context_tokens`` leave the appended text out. An append whose branch is released before any request sent it is
  never counted: the server never evaluated it.
* ``fork`` sends nothing: children copy the parent's text; their requests share the prompt through the server's
  prefix cache, so forks count in ``prompt_tokens_shared`` exactly as on the in-process engine.
* ``extend`` streams a continuation of the prefix. Plain extends of sibling branches (same prefix, same parameters,
  no stop strings, no ``stop_if``) issued together -- a strategy's ``gather`` over its forks -- share one request with
  ``n`` choices where the server honours ``n`` (vLLM, SGLang, llama.cpp's C++ server); elsewhere (llama-cpp-python's
  server) each branch is its own concurrent request. A server that refuses an ``n`` as too many (llama-server takes
  at most its slot count) gets requests of the size its refusal names from then on. Stop strings and ``stop_if`` are checked here, chunk by chunk, so ``matched_stop`` and
  ``"halted"`` mean what they mean on the in-process engine; closing the stream makes the server stop generating.
  An extend of at most ``WHOLE_MAX_TOKENS`` tokens with no stop string and no ``stop_if`` (a verdict, an answer
  probe) has nothing to stop early and is sent whole, not streamed: its response carries the usage that counts an
  append (see ``append``).
* ``score`` sends prefix + continuation with ``echo`` and ``logprobs`` and sums the continuation's prompt logprobs.
  A server whose prompt logprobs are missing or misaligned makes it raise ``ScoreUnsupportedError``; the Yes/No
  verifiers then read P(Yes) from the ``top_logprobs`` of one generated token (``Branch.last_top_logprobs``).
* ``release`` closes the branch's request once no other branch reads it.

One engine serves one remote model (the one named, or the only one the server lists); every branch has it as
``model``.

Token ids never cross the OpenAI API: a remote branch's ``tokens`` holds one ``-1`` per generated or appended token,
so counts are exact and ids unknown. Confidence and entropy come from the ``top_logprobs`` the server returns (the
entropy is over those k alternatives only, a lower bound of the model's); the last token's alternatives are kept as
``last_top_logprobs``.

Several base URLs: each request goes to the least-loaded server that is up (ties to the one that served the branch
before, whose prefix cache holds it). Connection errors, 429 and 5xx are retried, on another server at once if there
is one, else after an exponential backoff; a server that cannot be reached is skipped for ``DOWN_S`` seconds, and the
final error says which server failed and how. A 429, 502, 503 or 504 also sets the server aside for a while (its
``Retry-After``, else ``BUSY_S``) so that new requests go elsewhere first.

Faults during a stream are survived the same way. A stream that breaks (the server was killed, the connection
reset) or goes silent for ``stall_timeout`` seconds while the server does not answer a ping within ``PING_S`` (it
hangs: SIGSTOP, a wedged process; a server that is merely busy answers the ping and is waited for) is abandoned, the
server is set aside for ``DOWN_S``, and every branch it was extending resumes from the text it has so far, as a
request of its own for the tokens left, on another server if one is up (at most ``retries`` times per extend). The
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
import dataclasses
import math
import os
import random
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import httpx
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..prompts import CHAT_TEMPLATES
from .base import (Branch, Engine, EngineStats, HiddenUnsupportedError, Message, ModelInfo, PonderError,
                   PromptTooLongError, RemoteUnavailableError, SamplingParams, ScoreUnsupportedError, StopIf, Usage)

try:
    import openai
except ModuleNotFoundError as e:  # the client is an optional extra: only --engine openai needs it
    if e.name != "openai":
        raise
    raise PonderError('--engine openai needs the optional openai client: pip install "ponder[remote]"') from None

DOWN_S = 10.0  # how long a server that failed to connect (or hung, or broke a stream) is skipped
BUSY_S = 5.0  # how long a server that answered 429/502/503/504 without Retry-After is skipped
STALL_S = 10.0  # silence of a server (no response, no chunk) after which ponder asks whether it is alive
PING_S = 5.0  # how long that question (GET /models) may take before the server counts as hung
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0  # retry waits: 0.5 s, 1 s, 2 s, ... at most 8 s (less up to 25 % jitter)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"  # a prompt whose every token is predictable
WHOLE_MAX_TOKENS = 32  # a plain extend this short is sent whole: cancelling it saves little, its usage counts appends
_CONTEXT_ERRORS = ("context length", "context window", "maximum context", "exceed_context", "too long")


@dataclass
class _Server:
    url: str
    supports_n: bool
    # Probed on first need (see the module docstring): None until then.
    supports_logprobs: bool | None = None
    supports_echo_logprobs: bool | None = None  # prompt logprobs with echo, which score() needs
    in_flight: int = 0
    down_until: float = 0.0


@dataclass(eq=False)
class RemoteBranch(Branch):
    prompt: str = ""  # the rendered prompt; the text sent is prompt + text
    server: _Server | None = None  # the server that last served it (its prefix cache holds it)
    job: _Extend | None = None
    append_uncounted: bool = False  # text was appended that no request has counted yet (see ``append``)


@dataclass(eq=False)
class _Extend:
    branch: RemoteBranch
    params: SamplingParams
    stop_if: StopIf | None
    future: asyncio.Future
    text_start: int  # stop strings are searched in the text of this extend only
    done: bool = False
    generated: int = 0  # tokens this extend has received (a resumed extend asks for the rest)
    ended_here: bool = False  # ended by a stop string, stop_if or release rather than by the server
    request: asyncio.Task | None = None
    group: list[_Extend] = field(default_factory=list)  # the extends that read the same request

    @property
    def shareable(self) -> bool:
        return not self.params.stop and self.stop_if is None

    @property
    def streamed(self) -> bool:
        return not self.shareable or self.params.max_tokens > WHOLE_MAX_TOKENS


@dataclass
class _LoopClients:
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


class OpenAIEngine(Engine):
    def __init__(self, base_urls: list[str], model: str | None = None, *, chat_template: str = "qwen2.5",
                 api_key: str | None = None, timeout: float = 600.0, retries: int = 3, max_concurrency: int = 64,
                 max_n: int = 64, stall_timeout: float = STALL_S):
        if not base_urls:
            raise PonderError("the openai engine needs at least one base URL (e.g. http://127.0.0.1:8000/v1)")
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self._timeout = openai.Timeout(timeout, connect=5.0)
        self._retries = retries
        self._stall_timeout = stall_timeout
        # What faults cost (bench_faults.py reads them): requests sent again, extends resumed after a broken or hung
        # stream, servers found hung by a ping.
        self.faults = {"retries": 0, "resumed": 0, "hung": 0}
        self._max_concurrency = max_concurrency
        self._max_n = max_n
        self._template = _chat_formatter(chat_template)
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
        self._servers = [_probe_n(clients[url], url, listed[url], served) if url in listed
                         else _Server(url=url, supports_n=False, down_until=time.monotonic() + DOWN_S)
                         for url in urls]
        for client in clients.values():
            client.close()
        self._n_everywhere = all(s.supports_n for s in self._servers)
        self.model = ModelInfo(name=served, path=", ".join(urls))
        self._counters = EngineStats()
        self._live: set[RemoteBranch] = set()
        self._pending: list[_Extend] = []
        self._waiting_requests = 0
        self._loop_clients: _LoopClients | None = None

    # ---- setup ---------------------------------------------------------------------------------------------------

    def _clients(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        if self._loop_clients is None or self._loop_clients.loop is not loop:
            clients = {s.url: openai.AsyncOpenAI(base_url=s.url, api_key=self._api_key, timeout=self._timeout,
                                                 max_retries=0) for s in self._servers}  # see _request
            self._loop_clients = _LoopClients(
                loop=loop, clients=clients,
                slots={s.url: asyncio.Semaphore(self._max_concurrency) for s in self._servers},
                closer=loop.create_task(_close_when_cancelled(list(clients.values()))),
            )
        return self._loop_clients

    # ---- the Branch API ------------------------------------------------------------------------------------------

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        served = self.model.name
        if model is not None and model != served:
            raise PonderError(f"this openai engine serves {served!r} (at {self.model.path}), not {model!r}: one "
                              "engine serves one remote model for now")
        text = prompt if isinstance(prompt, str) else self._template(messages=list(prompt)).prompt
        if not text:
            raise PonderError("the prompt is empty")
        usage = usage if usage is not None else Usage()
        async with self._request(None, prompt=text, max_tokens=1, temperature=0.0) as (server, completion):
            counted = _usage_of(completion, server)
        usage.add("prompt_tokens", counted.prompt_tokens, served)
        usage.add("generated_tokens", counted.completion_tokens, served)  # the one token this request had to generate
        # What the server's own prefix cache held of the prompt (vLLM and SGLang report it; others say nothing).
        cached = getattr(getattr(counted, "prompt_tokens_details", None), "cached_tokens", None)
        if cached:
            usage.add("prompt_tokens_cached", cached, served)
        self._counters.prefills += 1
        self._counters.prefill_tokens += counted.prompt_tokens
        self._counters.generated_tokens += counted.completion_tokens
        root = RemoteBranch(engine=self, usage=usage, context_tokens=counted.prompt_tokens, model=served, prompt=text,
                            server=server)
        self._live.add(root)
        return root

    async def append(self, branch: Branch, text: str) -> Branch:
        assert isinstance(branch, RemoteBranch)
        if branch.job is not None:
            raise PonderError("cannot append to a branch while it is extending")
        branch.text += text
        branch.append_uncounted = True  # counted by the branch's next request (see the module docstring)
        return branch

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        assert isinstance(branch, RemoteBranch)
        if branch.job is not None:
            raise PonderError("cannot fork a branch while it is extending")
        await self._count_append(branch)  # once, before the children share it
        children = []
        for _ in range(n):
            child = RemoteBranch(
                engine=self, usage=branch.usage, context_tokens=branch.context_tokens, **branch.history(),
                prompt=branch.prompt, server=branch.server,
            )
            branch.usage.add("prompt_tokens_shared", branch.context_tokens, branch.model)
            self._live.add(child)
            children.append(child)
        return children

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        assert isinstance(branch, RemoteBranch)
        if branch.job is not None:
            raise PonderError("this branch is already extending")
        if params.wants_logprobs and not await self._supports("supports_logprobs"):
            raise PonderError("this strategy needs token logprobs, which the remote server does not return")
        if branch.released:  # while the first request that needs logprobs waited for their probe
            branch.finish_reason = "cancelled"
            return branch
        branch.finish_reason = branch.matched_stop = None
        loop = asyncio.get_running_loop()
        job = _Extend(branch, params, stop_if, loop.create_future(), text_start=len(branch.text))
        branch.job = job
        self._pending.append(job)
        if len(self._pending) == 1:
            # Siblings extended in the same gather() all start in this loop turn; dispatch once they have.
            loop.call_soon(self._dispatch_pending)
        try:
            return await job.future
        except asyncio.CancelledError:
            branch.release()  # the caller gave up (client gone, Ctrl-C): stop its request
            raise

    async def hidden(self, branch: Branch):
        raise HiddenUnsupportedError("an OpenAI-compatible server returns no hidden states: the hidden-state probe "
                                     "(verifier, weighting or step scorer 'probe'/'hidden') needs the in-process "
                                     "engine")

    async def score(self, branch: Branch, continuation: str) -> float:
        assert isinstance(branch, RemoteBranch)
        if not continuation:
            raise PonderError("score needs a non-empty continuation")
        if not await self._supports("supports_echo_logprobs"):
            raise ScoreUnsupportedError("score() needs prompt logprobs (echo with logprobs) that the remote server "
                                        "does not return correctly; vLLM does (llama-cpp-python 0.3's are shifted "
                                        "by one token)")
        prefix = branch.prompt + branch.text
        async with self._request(branch.server, prompt=prefix + continuation, max_tokens=1, temperature=0.0,
                                 echo=True, logprobs=1) as (server, completion):
            counted = _usage_of(completion, server)
        logprobs = completion.choices[0].logprobs
        if logprobs is None or not logprobs.token_logprobs or not logprobs.tokens:
            raise PonderError(f"{server.url} returned no prompt logprobs for score()")
        # The continuation is the end of the prompt. Servers differ in whether the echo lists the generated token and
        # in how text_offset counts special tokens, so find it from the prompt tokens' own texts, from the end.
        prompt_entries = list(zip(logprobs.tokens, logprobs.token_logprobs))[: counted.prompt_tokens]
        joined = "".join(token for token, _ in prompt_entries)
        if not joined.endswith(continuation):
            raise PonderError(f"{server.url} echoed a prompt that does not end with the scored continuation")
        start, position = len(joined) - len(continuation), 0
        total, scored = 0.0, 0
        for token, logprob in prompt_entries:
            if position + len(token) > start and logprob is not None:
                total += logprob
                scored += 1
            position += len(token)
        self._settle_append(branch, counted.prompt_tokens - scored)
        branch.usage.add("scored_tokens", scored, branch.model)
        branch.usage.add("generated_tokens", counted.completion_tokens, branch.model)
        self._counters.generated_tokens += counted.completion_tokens
        return total

    def release(self, branch: Branch) -> None:
        assert isinstance(branch, RemoteBranch)
        job = branch.job
        if job is not None:
            job.ended_here = True
            self._finish(job, "cancelled")
            if job.request is not None and all(j.done for j in job.group):
                job.request.cancel()  # closing the stream makes the server stop generating
        self._live.discard(branch)

    def stats(self) -> EngineStats:
        c = self._counters
        c.live_branches = len(self._live)
        c.kv_cells_used = sum(b.context_tokens for b in self._live)  # context the servers hold for live branches
        c.waiting = self._waiting_requests
        return c

    def close(self) -> None:
        state, self._loop_clients = self._loop_clients, None
        if state is None or state.loop.is_closed():
            return
        state.closer.cancel()
        if not state.loop.is_running():
            state.loop.run_until_complete(asyncio.gather(state.closer, return_exceptions=True))

    # ---- requests ------------------------------------------------------------------------------------------------

    async def _count_append(self, branch: RemoteBranch) -> None:
        """Count ``branch``'s uncounted append now, by a request of its own (see the module docstring)."""
        if not branch.append_uncounted:
            return
        async with self._request(branch.server, prompt=branch.prompt + branch.text, max_tokens=1,
                                 temperature=0.0) as (server, completion):
            counted = _usage_of(completion, server)
        branch.server = server
        self._settle_append(branch, counted.prompt_tokens)
        branch.usage.add("generated_tokens", counted.completion_tokens, branch.model)  # the token the API forces
        self._counters.prefills += 1
        self._counters.generated_tokens += counted.completion_tokens

    def _settle_append(self, branch: RemoteBranch, prefix_tokens: int) -> None:
        """Count ``branch``'s uncounted append from ``prefix_tokens``, the server's count of the branch's whole
        prefix (prompt and text) as one of its requests sent it."""
        if not branch.append_uncounted:
            return  # counted already (by another request on the same prefix) or nothing appended
        branch.append_uncounted = False
        # Never negative: text that merges with the branch's last tokens can retokenize shorter than it was sampled.
        appended = max(prefix_tokens - branch.context_tokens, 0)
        branch.tokens.extend([-1] * appended)
        branch.appended_tokens += appended
        branch.context_tokens += appended
        branch.usage.add("prompt_tokens", appended, branch.model)
        self._counters.prefill_tokens += appended

    async def _supports(self, capability: str) -> bool:
        """Whether every server honours ``capability`` (a ``_Server`` field probed on first need). Callers that ask
        at the same time share one probe; a probe that failed (a server down) is tried again by the next caller."""
        if any(getattr(s, capability) is None for s in self._servers):
            state = self._clients()
            probe = state.probes.get(capability)
            if probe is None or probe.done():
                probe = state.probes[capability] = asyncio.get_running_loop().create_task(
                    self._probe_servers(capability))
            await asyncio.shield(probe)  # one caller giving up does not cancel the others' probe
        return all(getattr(s, capability) for s in self._servers)

    async def _probe_servers(self, capability: str) -> None:
        probe, clients = _LAZY_PROBES[capability], self._clients().clients
        for server in self._servers:
            if getattr(server, capability) is None:
                setattr(server, capability, await probe(clients[server.url], server.url, self.model.name))

    def _dispatch_pending(self) -> None:
        jobs, self._pending = self._pending, []
        groups: dict[object, list[_Extend]] = {}
        for job in jobs:
            if job.done:  # released before it was sent
                continue
            if job.shareable and self._n_everywhere:
                key = (job.branch.prompt, job.branch.text, dataclasses.astuple(_without_seed(job.params)))
            else:
                key = job
            groups.setdefault(key, []).append(job)
        loop = asyncio.get_running_loop()
        for group in groups.values():
            for i in range(0, len(group), self._max_n):
                batch = group[i : i + self._max_n]
                request = loop.create_task(self._generate(batch))
                for job in batch:
                    job.request, job.group = request, batch

    async def _generate(self, jobs: list[_Extend], resumes: int = 0) -> None:
        """One request -- streamed, or sent whole when short and plain (see ``_Extend.streamed``) -- whose ``n``
        choices feed ``jobs`` (their branches share prefix and parameters). A stream lost to a dead or hung server
        is resumed: each unfinished job continues from its text so far in a request of its own (``resumes`` counts
        how often this extend has been)."""
        first = jobs[0]
        params, streamed = first.params, first.streamed
        left = params.max_tokens - first.generated  # a resumed extend asks for the tokens it has not had yet
        if left <= 0:  # the stream broke after the last token, before its finish reason
            self._finish(first, "length")
            return
        body = dict(prompt=first.branch.prompt + first.branch.text, max_tokens=left,
                    temperature=params.temperature, top_p=params.top_p,
                    extra_body={"top_k": params.top_k, "min_p": params.min_p,
                                **({"ignore_eos": True} if params.ignore_eos else {})})
        if streamed:
            body.update(stream=True, stream_options={"include_usage": True})
        if len(jobs) > 1:
            body["n"] = len(jobs)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.wants_logprobs:
            body["logprobs"] = max(params.top_logprobs, 1)
        counted, url, serving = 0, "the remote server", None
        try:
            if streamed:
                for job in jobs:
                    await self._count_append(job.branch)
            async with self._request(first.branch.server, **body) as (server, response):
                url, serving = server.url, server
                for job in jobs:
                    job.branch.server = server
                if not streamed:
                    prefix_tokens = _usage_of(response, server).prompt_tokens
                    for job in jobs:
                        self._settle_append(job.branch, prefix_tokens)
                    counted = self._take(jobs, response, counted)
                else:
                    async with response:
                        chunks = aiter(response)
                        while (chunk := await self._watch(server, _next_chunk(chunks))) is not _END:
                            counted = self._take(jobs, chunk, counted)
                            if all(j.done for j in jobs) and any(j.ended_here for j in jobs):
                                break  # the rest is of no use: closing the stream stops the server
            for job in jobs:
                if not job.done:
                    raise _StreamCut(
                        f"{url} ended the stream before the completion finished (llama-cpp-python's server "
                        "does so when another request arrives unless started with --interrupt_requests false)")
        except _TooManyChoices as exc:  # sent again in requests of at most the choices the server takes
            self._max_n = min(self._max_n, exc.limit)
            loop = asyncio.get_running_loop()
            for i in range(0, len(jobs), exc.limit):
                batch = jobs[i : i + exc.limit]
                request = loop.create_task(self._generate(batch, resumes))
                for job in batch:
                    job.request, job.group = request, batch
        except Exception as exc:  # every waiting extend gets the error; a bug reaches its caller unchanged
            _resolve_finished(jobs)
            error = exc
            lost = isinstance(exc, (openai.APIConnectionError, httpx.TransportError, _Stalled, _StreamCut))
            if lost and serving is not None and not isinstance(exc, _StreamCut):
                serving.down_until = time.monotonic() + DOWN_S  # dead or hung: the resumed requests go elsewhere
            unfinished = [j for j in jobs if not j.future.done()]
            if lost and streamed and unfinished and resumes < self._retries:
                self.faults["resumed"] += len(unfinished)
                loop = asyncio.get_running_loop()
                for job in unfinished:
                    job.request, job.group = loop.create_task(self._generate([job], resumes + 1)), [job]
                return
            if isinstance(exc, _Stalled):
                error = RemoteUnavailableError(f"{exc} (resumed {resumes} times)")
            elif lost:
                error = RemoteUnavailableError(f"lost the connection to {url} during generation "
                                               f"({type(exc).__name__}: {exc}; resumed {resumes} times)")
            elif isinstance(exc, openai.APIError):
                error = PonderError(f"{url} failed during generation: {exc}")
            for job in unfinished:
                job.branch.job = None
                job.done = True
                job.future.set_exception(error)
        finally:  # a request cancelled by release() too: the jobs the server finished get their branches
            _resolve_finished(jobs)

    async def _watch(self, server: _Server, awaitable):
        """Await ``awaitable`` (a request, or a stream's next chunk). If ``server`` sends nothing for
        ``stall_timeout`` seconds, ask it whether it is alive: one that does not answer within ``PING_S`` hangs, and
        ``_Stalled`` is raised; a busy one (its slots full, a long prompt) is waited for."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=self._stall_timeout)
                if done:
                    return task.result()
                if not await self._alive(server):
                    self.faults["hung"] += 1
                    raise _Stalled(f"{server.url} sent nothing for {self._stall_timeout:g} s and did not answer a "
                                   f"ping within {PING_S:g} s: it hangs")
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)

    async def _alive(self, server: _Server) -> bool:
        client = self._clients().clients[server.url].with_options(timeout=PING_S, max_retries=0)
        try:
            await client.models.list()
        except openai.APIConnectionError:  # timeouts included
            return False
        except openai.APIStatusError:
            pass  # it answers, if not with the list
        return True

    def _take(self, jobs: list[_Extend], chunk, counted: int) -> int:
        """Apply a streamed chunk (or a whole completion) to ``jobs``; return the tokens counted so far."""
        for choice in chunk.choices:
            job = jobs[choice.index]
            if not job.done:
                counted += self._feed(job, choice)
        if chunk.usage is not None:
            self._count_unseen(jobs, chunk.usage.completion_tokens - counted)
        return counted

    def _feed(self, job: _Extend, choice) -> int:
        """Apply one choice (a streamed delta or a whole completion's) to the job's branch; return the tokens it
        carried."""
        b = job.branch
        logprobs = choice.logprobs
        count = len(logprobs.tokens) if logprobs is not None and logprobs.tokens else int(bool(choice.text))
        if count:
            job.generated += count
            b.text += choice.text
            b.tokens.extend([-1] * count)
            b.context_tokens += count
            b.usage.add("generated_tokens", count, b.model)
            self._counters.generated_tokens += count
            if job.params.wants_logprobs and logprobs is not None:
                _record_logprobs(b, logprobs, job.params.top_logprobs)
            if job.params.stop and self._matched_stop(job, len(choice.text)):
                job.ended_here = True
                self._finish(job, "stop")
            elif job.stop_if is not None and job.stop_if(b):
                job.ended_here = True
                self._finish(job, "halted")
        if not job.done and choice.finish_reason is not None:  # the caller hears of it once the usage is read
            self._finish(job, "length" if choice.finish_reason == "length" else "stop", resolve=False)
        return count

    def _count_unseen(self, jobs: list[_Extend], unseen: int) -> None:
        """Tokens the server reports but did not stream as chunks of their own (e.g. an end token) still cost."""
        usages = {id(j.branch.usage): j.branch.usage for j in jobs}
        if unseen > 0 and len(usages) == 1:
            next(iter(usages.values())).add("generated_tokens", unseen, jobs[0].branch.model)
            self._counters.generated_tokens += unseen

    def _matched_stop(self, job: _Extend, piece_len: int) -> bool:
        b = job.branch
        longest = max(len(s) for s in job.params.stop)
        window_start = max(job.text_start, len(b.text) - piece_len - longest + 1)
        for stop in job.params.stop:
            if b.text.find(stop, window_start) >= 0:
                b.matched_stop = stop
                return True
        return False

    def _finish(self, job: _Extend, reason: str, resolve: bool = True) -> None:
        """End ``job``. ``resolve=False`` (the server ended it) leaves its caller waiting until the request is read
        to its end, so that the usage that follows the last chunk is counted before the caller goes on."""
        job.done = True
        job.branch.finish_reason = reason
        job.branch.job = None
        if resolve and not job.future.done():
            job.future.set_result(job.branch)

    @asynccontextmanager
    async def _request(self, hint: _Server | None, **body):
        """Send ``body`` to ``/v1/completions`` on the least-loaded server that is up; yield (server, response).

        Connection errors, 429 and 5xx are retried up to ``retries`` times: at once on another server if one has not
        failed yet, else after an exponential backoff. The server's concurrency slot is held until the caller leaves
        the block (a stream is read inside it).
        """
        clients = self._clients()
        failed: set[str] = set()
        for attempt in range(self._retries + 1):
            server = self._pick(hint, failed)
            server.in_flight += 1
            try:
                async with self._slot(clients.slots[server.url]):
                    self._counters.decode_steps += 1
                    try:
                        response = await self._watch(server, clients.clients[server.url].completions.create(
                            model=self.model.name, **body))
                    except openai.APIConnectionError as exc:
                        server.down_until = time.monotonic() + DOWN_S
                        error = RemoteUnavailableError(f"cannot reach the OpenAI-compatible server at {server.url} "
                                                       f"({exc.__cause__ or exc}); is it running?")
                    except _Stalled as exc:
                        server.down_until = time.monotonic() + DOWN_S
                        error = RemoteUnavailableError(str(exc))
                    except openai.APIStatusError as exc:
                        error = _status_error(server, exc, retried=attempt)
                        if not isinstance(error, RemoteUnavailableError):
                            limit = _n_limit(exc, body)
                            if limit is not None:  # llama-server takes n up to its slot count
                                raise _TooManyChoices(limit) from None
                            raise error from None
                        if exc.status_code in (429, 502, 503, 504):  # busy or going away: new requests go elsewhere
                            server.down_until = time.monotonic() + _retry_after(exc)
                    else:
                        yield server, response
                        return
            finally:
                server.in_flight -= 1
            failed.add(server.url)
            if attempt == self._retries:
                raise error
            self.faults["retries"] += 1
            if len(failed) >= len(self._servers):  # every server has failed once: wait before the next round
                failed.clear()
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt) * random.uniform(0.75, 1.0))

    @asynccontextmanager
    async def _slot(self, slots: asyncio.Semaphore):
        self._waiting_requests += 1
        try:
            await slots.acquire()
        finally:
            self._waiting_requests -= 1
        try:
            yield
        finally:
            slots.release()

    def _pick(self, hint: _Server | None, failed: set[str]) -> _Server:
        now = time.monotonic()
        untried = [s for s in self._servers if s.url not in failed] or self._servers
        candidates = [s for s in untried if s.down_until <= now] or untried
        return min(candidates, key=lambda s: (s.in_flight, s is not hint))


class _Stalled(Exception):
    """A server went silent and did not answer a ping: it hangs (see ``OpenAIEngine._watch``)."""


class _TooManyChoices(Exception):
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


class _StreamCut(Exception):
    """A stream ended without its completion's finish reason."""


_END = object()


async def _next_chunk(chunks):
    """The next chunk of a stream, or ``_END`` (a task cannot end with StopAsyncIteration's kin cleanly)."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return _END


def _resolve_finished(jobs: list[_Extend]) -> None:
    """Hand the jobs the server finished to their callers."""
    for job in jobs:
        if job.done and not job.future.done():
            job.future.set_result(job.branch)


def _retrieve(task: asyncio.Task) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _retry_after(exc: openai.APIStatusError) -> float:
    try:
        return min(max(float(exc.response.headers.get("retry-after", "")), 0.5), 60.0)
    except ValueError:
        return BUSY_S


def _without_seed(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, seed=None)


def _record_logprobs(b: RemoteBranch, logprobs, top_k: int) -> None:
    b.token_logprobs.extend(lp for lp in logprobs.token_logprobs if lp is not None)
    if not top_k:
        return
    for alternatives in logprobs.top_logprobs or []:
        best = sorted((alternatives or {}).values(), reverse=True)[:top_k]
        if best:
            b.confidences.append(-sum(best) / len(best))
            b.entropies.append(-sum(math.exp(lp) * lp for lp in best))
            b.last_top_logprobs = dict(alternatives)


def _usage_of(completion, server: _Server):
    if completion.usage is None:
        raise PonderError(f"{server.url} reports no token usage; ponder needs it to count tokens honestly")
    return completion.usage


def _status_error(server: _Server, exc: openai.APIStatusError, retried: int) -> PonderError:
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


def _probe_n(client: openai.OpenAI, url: str, models: list[str], served: str) -> _Server:
    """The server, once it is known to serve ``served`` and whether it honours ``n`` > 1 (llama.cpp's servers ignore
    or reject it). The other capabilities are probed on first need (``_LAZY_PROBES``)."""
    if served not in models:
        raise PonderError(f"{url} does not serve {served!r}; it serves: {', '.join(models) or 'nothing'}")
    try:  # temperature 1: some servers refuse n > 1 with greedy sampling
        with_n = client.completions.create(model=served, prompt="1+1=", max_tokens=1, temperature=1.0, n=2)
    except openai.APIStatusError:
        return _Server(url=url, supports_n=False)
    return _Server(url=url, supports_n=len(with_n.choices) == 2)


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
    logprobs = answer.choices[0].logprobs if answer is not None else None
    return logprobs is not None and bool(logprobs.token_logprobs)


async def _probe_echo_logprobs(client: openai.AsyncOpenAI, url: str, served: str) -> bool:
    """Does it return prompt logprobs with ``echo`` that belong to the right tokens (llama-cpp-python 0.3's are
    shifted by one position)?"""
    echoed = await _probe_answer(client, url, served, COUNTING, echo=True, logprobs=1)
    return echoed is not None and _echo_aligned(echoed.choices[0].logprobs)


_LAZY_PROBES = {"supports_logprobs": _probe_logprobs, "supports_echo_logprobs": _probe_echo_logprobs}


def _echo_aligned(logprobs) -> bool:
    """In a counting prompt nearly every token is the model's top guess: if the top alternatives listed at position i
    match token i, the prompt logprobs are aligned; if they match token i+1, every entry is off by one position."""
    if logprobs is None or not logprobs.tokens or not logprobs.top_logprobs:
        return False
    tokens = logprobs.tokens
    guesses = [max(top, key=top.get) if top else None for top in logprobs.top_logprobs]
    aligned = sum(guesses[i] == tokens[i] for i in range(1, len(tokens)))
    off_by_one = sum(guesses[i] == tokens[i + 1] for i in range(1, len(tokens) - 1))
    return aligned > off_by_one


def _chat_formatter(template: str) -> Jinja2ChatFormatter:
    if template in CHAT_TEMPLATES:
        source, eos = CHAT_TEMPLATES[template], "<|im_end|>"
    else:
        path = Path(template).expanduser()
        if not path.is_file():
            raise PonderError(f"chat template {template!r} is neither a known name ({', '.join(CHAT_TEMPLATES)}) "
                              "nor a file")
        source, eos = path.read_text(), ""
    # No BOS in the text: the server adds it when it tokenizes a /v1/completions prompt.
    return Jinja2ChatFormatter(template=source, eos_token=eos, bos_token="", add_generation_prompt=True)
