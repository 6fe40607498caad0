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
  server) each branch is its own concurrent request. A server that refuses an ``n`` as too many (llama-server takes at
  most its slot count) gets requests of the size its refusal names from then on. Stop strings and ``stop_if`` are
  checked here, chunk by chunk, so ``matched_stop`` and ``"halted"`` mean what they mean on the in-process engine;
  closing the stream makes the server stop generating. An extend of at most ``WHOLE_MAX_TOKENS`` tokens with no stop
  string and no ``stop_if`` (a verdict, an answer probe) has nothing to stop early and is sent whole, not streamed: its
  response carries the usage that counts an append (see ``append``).
* ``score`` sends prefix + continuation with ``echo`` and ``logprobs`` and sums the continuation's prompt logprobs.
  A server whose prompt logprobs are missing or misaligned makes it raise ``ScoreUnsupportedError``; the Yes/No
  verifiers then read P(Yes) from the ``top_logprobs`` of one generated token (``Branch.last_top_logprobs``).
* ``release`` closes the branch's request once no other branch reads it.

One engine serves one remote model (the one named, or the only one the server lists); every branch has it as
``model``.

Token ids never cross the OpenAI API: a remote branch's ``tokens`` holds one ``-1`` per generated or appended token, so
counts are exact and ids unknown. Confidence and entropy come from the ``top_logprobs`` the server returns (the entropy
is that of those k alternatives renormalised, as on the in-process engine); the last token's alternatives are kept as
``last_top_logprobs``.

The servers, retries, faults and capability probes underneath are ``transport.py``'s. This module stays one piece
(about 470 lines, a sixth of them this docstring): the Branch operations and the streaming that carries out their
extends share one set of pending-extend and append-counting bookkeeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx
import openai
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..base import (Branch, Engine, EngineStats, HiddenUnsupportedError, Message, ModelInfo, PonderError,
                    RemoteUnavailableError, SamplingParams, ScoreUnsupportedError, StopIf, Usage)
from ..chat_templates import CHAT_TEMPLATES
from ..tokens import end_reason, top_k_confidence, top_k_entropy
from .transport import (END, STALL_S, Server, Stalled, TokenLogprobs, TooManyChoices, Transport, next_chunk,
                        token_logprobs_of, usage_of)

WHOLE_MAX_TOKENS = 32  # a plain extend this short is sent whole: cancelling it saves little, its usage counts appends


@dataclass(eq=False)
class RemoteBranch(Branch):
    prompt: str = ""  # the rendered prompt; the text sent is prompt + text
    server: Server | None = None  # the server that last served it (its prefix cache holds it)
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


class OpenAIEngine(Engine):
    def __init__(self, base_urls: list[str], model: str | None = None, *, chat_template: str = "qwen2.5",
                 api_key: str | None = None, timeout: float = 600.0, retries: int = 3, max_concurrency: int = 64,
                 max_n: int = 64, stall_timeout: float = STALL_S):
        if not base_urls:
            raise PonderError("the openai engine needs at least one base URL (e.g. http://127.0.0.1:8000/v1)")
        self._max_n = max_n
        self._template = _chat_formatter(chat_template)
        self._counters = EngineStats()
        self._transport = Transport(base_urls, model, api_key=api_key, timeout=timeout, retries=retries,
                                    max_concurrency=max_concurrency, stall_timeout=stall_timeout,
                                    counters=self._counters)
        self.faults = self._transport.faults  # what faults cost (benchmarks/robustness/bench_faults.py reads them)
        self.model = ModelInfo(name=self._transport.served, path=", ".join(self._transport.urls))
        self._live: set[RemoteBranch] = set()
        self._pending: list[_Extend] = []

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
        async with self._transport.request(None, prompt=text, max_tokens=1, temperature=0.0) as (server, completion):
            counted = usage_of(completion, server)
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
        if params.wants_logprobs and not await self._transport.supports("supports_logprobs"):
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
        if not await self._transport.supports("supports_echo_logprobs"):
            raise ScoreUnsupportedError("score() needs prompt logprobs (echo with logprobs) that the remote server "
                                        "does not return correctly; vLLM does (llama-cpp-python 0.3's are shifted "
                                        "by one token)")
        prefix = branch.prompt + branch.text
        async with self._transport.request(branch.server, prompt=prefix + continuation, max_tokens=1, temperature=0.0,
                                 echo=True, logprobs=1) as (server, completion):
            counted = usage_of(completion, server)
        entries = token_logprobs_of(completion.choices[0].logprobs)
        if entries is None or not entries.tokens:
            raise PonderError(f"{server.url} returned no prompt logprobs for score()")
        # The continuation is the end of the prompt. Servers differ in whether the echo lists the generated token and
        # in how text_offset counts special tokens, so find it from the prompt tokens' own texts, from the end.
        prompt_entries = list(zip(entries.tokens, entries.logprobs))[: counted.prompt_tokens]
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
        c.waiting = self._transport.waiting_requests
        return c

    def close(self) -> None:
        self._transport.close()

    # ---- requests ------------------------------------------------------------------------------------------------

    async def _count_append(self, branch: RemoteBranch) -> None:
        """Count ``branch``'s uncounted append now, by a request of its own (see the module docstring)."""
        if not branch.append_uncounted:
            return
        async with self._transport.request(branch.server, prompt=branch.prompt + branch.text, max_tokens=1,
                                 temperature=0.0) as (server, completion):
            counted = usage_of(completion, server)
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

    def _dispatch_pending(self) -> None:
        jobs, self._pending = self._pending, []
        groups: dict[object, list[_Extend]] = {}
        for job in jobs:
            if job.done:  # released before it was sent
                continue
            if job.shareable and self._transport.n_everywhere:
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
            async with self._transport.request(first.branch.server, **body) as (server, response):
                url, serving = server.url, server
                for job in jobs:
                    job.branch.server = server
                if not streamed:
                    prefix_tokens = usage_of(response, server).prompt_tokens
                    for job in jobs:
                        self._settle_append(job.branch, prefix_tokens)
                    counted = self._take(jobs, response, counted)
                else:
                    async with response:
                        chunks = aiter(response)
                        while (chunk := await self._transport.watch(server, next_chunk(chunks))) is not END:
                            counted = self._take(jobs, chunk, counted)
                            if all(j.done for j in jobs) and any(j.ended_here for j in jobs):
                                break  # the rest is of no use: closing the stream stops the server
            for job in jobs:
                if not job.done:
                    raise _StreamCut(
                        f"{url} ended the stream before the completion finished (llama-cpp-python's server "
                        "does so when another request arrives unless started with --interrupt_requests false)")
        except TooManyChoices as exc:  # sent again in requests of at most the choices the server takes
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
            lost = isinstance(exc, (openai.APIConnectionError, httpx.TransportError, Stalled, _StreamCut))
            if lost and serving is not None and not isinstance(exc, _StreamCut):
                self._transport.set_down(serving)  # dead or hung: the resumed requests go elsewhere
            unfinished = [j for j in jobs if not j.future.done()]
            if lost and streamed and unfinished and resumes < self._transport.retries:
                self.faults["resumed"] += len(unfinished)
                loop = asyncio.get_running_loop()
                for job in unfinished:
                    job.request, job.group = loop.create_task(self._generate([job], resumes + 1)), [job]
                return
            if isinstance(exc, Stalled):
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
        entries = token_logprobs_of(choice.logprobs)
        count = len(entries.tokens) if entries is not None else int(bool(choice.text))
        if count:
            job.generated += count
            b.text += choice.text
            b.tokens.extend([-1] * count)
            b.context_tokens += count
            b.usage.add("generated_tokens", count, b.model)
            self._counters.generated_tokens += count
            if job.params.wants_logprobs and entries is not None:
                _record_logprobs(b, entries, job.params.top_logprobs)
            # No token allowance here: the server reports the length itself (``finish_reason`` below).
            reason = end_reason(b, job.params, job.stop_if, job.text_start, len(choice.text), remaining=None)
            if reason is not None:
                job.ended_here = True
                self._finish(job, reason)
        if not job.done and choice.finish_reason is not None:  # the caller hears of it once the usage is read
            self._finish(job, "length" if choice.finish_reason == "length" else "stop", resolve=False)
        return count

    def _count_unseen(self, jobs: list[_Extend], unseen: int) -> None:
        """Tokens the server reports but did not stream as chunks of their own (e.g. an end token) still cost."""
        usages = {id(j.branch.usage): j.branch.usage for j in jobs}
        if unseen > 0 and len(usages) == 1:
            next(iter(usages.values())).add("generated_tokens", unseen, jobs[0].branch.model)
            self._counters.generated_tokens += unseen

    def _finish(self, job: _Extend, reason: str, resolve: bool = True) -> None:
        """End ``job``. ``resolve=False`` (the server ended it) leaves its caller waiting until the request is read
        to its end, so that the usage that follows the last chunk is counted before the caller goes on."""
        job.done = True
        job.branch.finish_reason = reason
        job.branch.job = None
        if resolve and not job.future.done():
            job.future.set_result(job.branch)


class _StreamCut(Exception):
    """A stream ended without its completion's finish reason."""


def _resolve_finished(jobs: list[_Extend]) -> None:
    """Hand the jobs the server finished to their callers."""
    for job in jobs:
        if job.done and not job.future.done():
            job.future.set_result(job.branch)


def _without_seed(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, seed=None)


def _record_logprobs(b: RemoteBranch, entries: TokenLogprobs, top_k: int) -> None:
    b.token_logprobs.extend(lp for lp in entries.logprobs if lp is not None)
    if not top_k:
        return
    for alternatives in entries.top:
        best = sorted(alternatives.values(), reverse=True)[:top_k]
        if best:
            b.confidences.append(top_k_confidence(best))
            b.entropies.append(top_k_entropy(best))
            b.last_top_logprobs = dict(alternatives)


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
