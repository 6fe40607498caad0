"""The one ruler for every system: an HTTP proxy in front of the model server that records each generation request.

Every system under test is pointed at ``{proxy}/{system}/v1`` instead of the server's ``/v1``; the proxy strips the
system's name from the path, forwards the request, and records one ``Upstream`` entry per request it sends upstream:
the system, the endpoint, whether it streamed, the sampling it asked for, prompt and completion tokens, wall time.

Counts come from the server's own ``usage`` whenever it reports one (every non-streamed response; a stream only when
the server sends a usage chunk). llama-cpp-python's server sends none in a stream, so a streamed request is counted
with ``count_tokens`` -- the served model's own tokenizer -- over the prompt and the streamed text, and the entry says
so (``counted_by``). A stream the client closes early (ponder closes a branch's stream once it is done) is closed
upstream too, which stops the server, and counts what was streamed.

So that every system meets the same server, the proxy also evens out what llama-cpp-python's server does not honour:

* ``n`` > 1 is sent as ``n`` requests of one choice (with seeds ``seed + i`` when a seed is given), merged into one
  answer, as vLLM would give it; without this a system that asks for ``n`` choices (optillm's ``bon``) gets one.
* ``max_completion_tokens`` becomes ``max_tokens`` (its_hub sends the former; that server ignores it and would
  generate to the end of its context).
* ``sampler`` fields (e.g. ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``) are set on every request, whatever the
  system sent: that server's own defaults (min_p 0.05, repeat_penalty 1.1) differ from ponder's. Temperature and
  token limits stay each system's own and are recorded.

Only POSTs to ``/completions`` and ``/chat/completions`` are generations and recorded; anything else (``GET
/models``, a tokenizer endpoint) is passed through unrecorded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

GENERATIONS = ("completions", "chat/completions")


@dataclass
class Upstream:
    """One request the proxy sent to the server."""

    system: str
    endpoint: str  # "completions" or "chat/completions"
    stream: bool
    temperature: float | None
    max_tokens: int | None
    prompt_tokens: int | None = None  # None: the server reported none and there was no way to count it
    completion_tokens: int = 0
    counted_by: str = "usage"  # "usage" (the server's own), "tokenizer" (count_tokens) or "chunks" (stream chunks)
    wall_s: float = 0.0
    status: int = 200
    closed_early: bool = False  # the client closed the stream before the server finished


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0  # summed over requests (they may overlap)
    uncounted_prompts: int = 0  # requests whose prompt tokens could not be counted
    failed: int = 0  # requests the server answered with an error status

    def minus(self, earlier: Totals) -> Totals:
        return Totals(**{k: v - getattr(earlier, k) for k, v in asdict(self).items()})


@dataclass
class _Choice:
    """What one streamed choice carried, to count it when the server reports no usage."""

    text: str = ""
    chunks: int = 0


@dataclass
class CountingProxy:
    upstream: str  # the server's root, e.g. http://127.0.0.1:8080 (its API under /v1)
    sampler: dict = field(default_factory=dict)  # fields set on every generation request
    count_tokens: Callable[[str], int] | None = None  # the served model's tokenizer, for streams without usage
    split_n: bool = True
    timeout_s: float = 1800.0
    records: list[Upstream] = field(default_factory=list)

    def __post_init__(self):
        self.upstream = self.upstream.rstrip("/")
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self.app = Starlette(routes=[Route("/{system}/v1/{path:path}", self._handle, methods=["GET", "POST"])])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- running it ----------------------------------------------------------------------------------------------

    def start(self) -> CountingProxy:
        """Serve on a free port of 127.0.0.1 from a thread of this process; ``self.url`` is its root."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the counting proxy did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def base_url(self, system: str) -> str:
        """The OpenAI base URL that ``system`` is given."""
        return f"{self.url}/{system}/v1"

    # ---- reading the counts --------------------------------------------------------------------------------------

    def totals(self, system: str, settle_s: float = 5.0) -> Totals:
        """Everything recorded for ``system`` so far, once its requests in flight have ended (a stream the client
        closed is recorded a moment after the client saw it end), or after ``settle_s``."""
        deadline = time.monotonic() + settle_s
        while self._in_flight.get(system, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        totals = Totals()
        with self._lock:
            for r in self.records:
                if r.system != system:
                    continue
                totals.requests += 1
                totals.prompt_tokens += r.prompt_tokens or 0
                totals.uncounted_prompts += r.prompt_tokens is None
                totals.completion_tokens += r.completion_tokens
                totals.wall_s += r.wall_s
                totals.failed += r.status >= 400
        return totals

    # ---- the proxy -----------------------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        system, path = request.path_params["system"], request.path_params["path"]
        url = f"{self.upstream}/v1/{path}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        if request.method != "POST" or path not in GENERATIONS:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                answer = await client.request(request.method, url, content=await request.body(), headers=headers)
            return Response(answer.content, status_code=answer.status_code,
                            media_type=answer.headers.get("content-type"))
        body = json.loads(await request.body())
        n = int(body.pop("n", None) or 1) if self.split_n else 1
        bodies = [self._upstream_body(body, i if n > 1 else None) for i in range(n)]
        if body.get("stream"):
            return StreamingResponse(self._stream(system, path, url, headers, bodies),
                                     media_type="text/event-stream")
        return await self._complete(system, path, url, headers, bodies)

    def _upstream_body(self, body: dict, choice: int | None) -> dict:
        sent = {**body, **self.sampler}
        if "max_completion_tokens" in sent:
            limit = sent.pop("max_completion_tokens")
            sent.setdefault("max_tokens", limit)
        if choice is not None and sent.get("seed") is not None:
            sent["seed"] = sent["seed"] + choice  # n choices of one request are different samples
        return sent

    def _begin(self, system: str, path: str, body: dict, stream: bool) -> Upstream:
        with self._lock:
            self._in_flight[system] = self._in_flight.get(system, 0) + 1
        return Upstream(system=system, endpoint=path, stream=stream, temperature=body.get("temperature"),
                        max_tokens=body.get("max_tokens"))

    def _end(self, record: Upstream, started: float) -> None:
        record.wall_s = round(time.perf_counter() - started, 4)
        with self._lock:
            self.records.append(record)
            self._in_flight[record.system] -= 1

    async def _complete(self, system: str, path: str, url: str, headers: dict, bodies: list[dict]) -> Response:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            answers = await asyncio.gather(*(self._one(client, system, path, url, headers, b) for b in bodies))
        failed = next((a for a in answers if a.status_code >= 400), None)
        if failed is not None:
            return Response(failed.content, status_code=failed.status_code,
                            media_type=failed.headers.get("content-type"))
        merged = answers[0].json()
        if len(answers) > 1:
            choices = [a.json()["choices"][0] for a in answers]
            merged["choices"] = [{**c, "index": i} for i, c in enumerate(choices)]
            usages = [a.json().get("usage") or {} for a in answers]
            merged["usage"] = {k: sum(u.get(k, 0) for u in usages)
                               for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return JSONResponse(merged)

    async def _one(self, client: httpx.AsyncClient, system: str, path: str, url: str, headers: dict,
                   body: dict) -> httpx.Response:
        record, started = self._begin(system, path, body, stream=False), time.perf_counter()
        try:
            answer = await client.post(url, json=body, headers=headers)
            record.status = answer.status_code
            usage = (answer.json().get("usage") or {}) if answer.status_code < 400 else {}
            record.prompt_tokens = usage.get("prompt_tokens", 0 if answer.status_code >= 400 else None)
            record.completion_tokens = usage.get("completion_tokens", 0)
            return answer
        finally:
            self._end(record, started)

    async def _stream(self, system: str, path: str, url: str, headers: dict,
                      bodies: list[dict]) -> AsyncIterator[bytes]:
        """The upstream streams of ``bodies`` as one stream: each chunk's choice index becomes its request's index,
        one final usage chunk sums theirs (when the client asked for usage), one ``[DONE]`` ends it."""
        queue: asyncio.Queue = asyncio.Queue()
        usages: list[dict] = []
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            readers = [asyncio.create_task(self._read_stream(client, system, path, url, headers, body, index, queue,
                                                             usages))
                       for index, body in enumerate(bodies)]
            try:
                for _ in readers:
                    while (item := await queue.get()) is not None:
                        yield item
                if usages and bodies[0].get("stream_options", {}).get("include_usage"):
                    summed = {k: sum(u.get(k, 0) for u in usages)
                              for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
                    yield f"data: {json.dumps({'choices': [], 'usage': summed})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:  # the client went away, or all is sent: close what is still open upstream
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)

    async def _read_stream(self, client: httpx.AsyncClient, system: str, path: str, url: str, headers: dict,
                           body: dict, index: int, queue: asyncio.Queue, usages: list[dict]) -> None:
        """Forward one upstream stream's events into ``queue`` (then None), counting what it carries."""
        record, started = self._begin(system, path, body, stream=True), time.perf_counter()
        seen: dict[int, _Choice] = {}
        usage: dict | None = None
        finished = False
        try:
            async with client.stream("POST", url, json=body, headers=headers) as answer:
                record.status = answer.status_code
                if answer.status_code >= 400:
                    record.prompt_tokens = 0
                    await queue.put(f"data: {(await answer.aread()).decode()}\n\n".encode())
                    finished = True
                    return
                async for line in answer.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        usages.append(usage)
                        if not chunk.get("choices"):
                            continue  # the proxy sends one summed usage chunk itself
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                        counted = seen.setdefault(choice.get("index", 0), _Choice())
                        counted.text += piece
                        counted.chunks += bool(piece)
                        choice["index"] = index
                    await queue.put(f"data: {json.dumps(chunk)}\n\n".encode())
                else:
                    finished = True
        finally:
            record.closed_early = not finished
            if record.status < 400:
                self._count_stream(record, body, path, usage, seen)
            self._end(record, started)
            queue.put_nowait(None)

    def _count_stream(self, record: Upstream, body: dict, path: str, usage: dict | None,
                      seen: dict[int, _Choice]) -> None:
        if usage is not None and not record.closed_early:
            record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            return
        if self.count_tokens is not None:
            record.counted_by = "tokenizer"
            record.completion_tokens = sum(self.count_tokens(c.text) for c in seen.values() if c.text)
            if path == "completions" and isinstance(body.get("prompt"), str):
                record.prompt_tokens = self.count_tokens(body["prompt"])
        else:
            record.counted_by = "chunks"
            record.completion_tokens = sum(c.chunks for c in seen.values())
        if record.prompt_tokens is None and usage is not None:
            record.prompt_tokens = usage["prompt_tokens"]
