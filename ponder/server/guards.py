"""What keeps a hostile or broken client from hurting the others: bounded bodies, deadlines, a per-client cap.

A request passes these guards, outermost first:

1. ``GuardedH11Protocol`` (connection level): uvicorn's HTTP/1.1 protocol with the two deadlines uvicorn lacks. A
   connection must deliver a request's headers within ``header_timeout_s`` of connecting (or of its previous
   answer), and a client that stops reading its answer is cut off ``send_timeout_s`` after its bytes stop moving;
   the app sees that as a disconnect, which cancels the request and frees its branches.
2. ``ClientCap``: at most ``max_per_client`` ``/v1/`` requests in progress per client address (reading, queued,
   running or sending); more are answered 429 with ``Retry-After`` before their bodies are read.
3. ``BodyLimit``: the whole body is read before the app sees it: 413 if it is (or declares itself) larger than
   ``max_body_bytes``, 408 if it has not arrived within ``body_timeout_s``. Parsing then costs the event loop at most
   what a body of that size costs.
4. ``ContextCheck`` (called by the app once the request is parsed): a prompt with more tokens than the context holds
   is refused after tokenizing only as much of it as it takes to count past the context.

``uvicorn_server`` builds the uvicorn server with the protocol; ``create_app`` adds the middleware;
``prompt_chars_that_fit`` gives ``max_prompt_chars`` its default. The client address (``client_of``) is the peer's,
or the one a proxy on 127.0.0.1 names in ``X-Forwarded-For`` (uvicorn's proxy-header rule).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
from collections import Counter

import uvicorn
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine.base import Engine
from .config import ServerConfig
from .schemas import RETRY_AFTER_S, ApiError

log = logging.getLogger("ponder.server")


def uvicorn_server(app, config: ServerConfig, **options) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose connections keep ``config``'s header and send deadlines."""
    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=config.header_timeout_s,
                                 send_timeout_s=config.send_timeout_s)
    return uvicorn.Server(uvicorn.Config(app, http=protocol, **options))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and one for every stalled write."""

    def __init__(self, *args, header_timeout_s: float, send_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.send_timeout_s = header_timeout_s, send_timeout_s
        self._headers_due: asyncio.TimerHandle | None = None
        self._cycle_before_headers = None  # the request cycle current while the next one's headers are awaited
        self._write_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            # The kernel takes a few MB of answer into its send buffer before the transport's own buffer fills and
            # pause_writing() (below) starts its clock; so a client that reads nothing of an answer smaller than that
            # would hold the connection, and those megabytes, until the kernel's own retries give up (minutes). With
            # this option the kernel aborts a connection whose bytes have waited unsent for send_timeout_s (the
            # client's window stays closed), even after the server has closed its end.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.send_timeout_s * 1000))
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_due is not None and self.cycle is not self._cycle_before_headers:
            self._headers_due.cancel()  # the headers are in: a new request cycle has started
            self._headers_due = None

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self.cycle is answered:
            self._await_headers()

    def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
        super().pause_writing()
        if self._write_due is None:
            self._write_due = self.loop.call_later(self.send_timeout_s, self._drop, "stopped reading its answer",
                                                   self.send_timeout_s)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_due is not None:
            self._write_due.cancel()
            self._write_due = None

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self._headers_due, self._write_due):
            if deadline is not None:
                deadline.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        self._cycle_before_headers = self.cycle
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._drop, "sent no complete request "
                                                 "headers", self.header_timeout_s)

    def _drop(self, what: str, timeout_s: float) -> None:
        log.info("dropped the connection of %s: it %s within %g s", self.client and self.client[0], what, timeout_s)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a FIN queued behind bytes the client does not read: the kernel frees them
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()  # not close(): that would wait to flush bytes the client does not read


class ClientCap:
    """ASGI middleware: at most ``limit`` ``/v1/`` requests in progress per client address; beyond that, 429."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.in_progress: Counter[str] = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        client = client_of(scope)
        if self.in_progress[client] >= self.limit:
            error = ApiError(429, f"this client already has {self.limit} requests in progress; retry when one has "
                                  "finished", type="rate_limit_error", code="too_many_requests_from_client",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
            return await error_response(error)(scope, receive, send)
        self.in_progress[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress[client] -= 1
            if not self.in_progress[client]:
                del self.in_progress[client]


def client_of(scope) -> str:
    """The address a request comes from (uvicorn has applied its proxy-header rule to ``scope["client"]``)."""
    return scope["client"][0] if scope.get("client") else "unknown"


class BodyTooLarge(Exception):
    pass


class ClientLeft(Exception):
    pass


class BodyLimit:
    """ASGI middleware: read the whole request body, at most ``max_bytes`` within ``timeout_s``, then run the app.

    The app receives the body as one message; its later ``receive()`` calls (the disconnect a request waits for) go
    to the server. An oversized body is answered without reading the rest: uvicorn discards what still arrives, and
    the connection's header deadline ends a client that never stops sending.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                             code="request_too_large")
        if _declared_length(scope) > self.max_bytes:
            return await error_response(too_large)(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except BodyTooLarge:
            return await error_response(too_large)(scope, receive, send)
        except asyncio.TimeoutError:
            slow = ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                            code="request_timeout", headers={"Connection": "close"})
            return await error_response(slow)(scope, receive, send)
        except ClientLeft:
            return None  # nobody is left to answer
        delivered = False

        async def receive_after_body():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_after_body, send)

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _declared_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)  # h11 has refused a malformed one already
    return 0


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def prompt_chars_that_fit(engine: Engine) -> int | None:
    """The most characters a prompt can have and still fit in the engine's context: its size in tokens times the
    characters of the vocabulary's longest token, since no text packs more characters into a token. None for an
    engine that does not expose its context size and vocabulary (a remote server refuses long prompts itself)."""
    try:
        context, vocabulary, token_text = engine.n_ctx, engine.n_vocab, engine.token_text
    except AttributeError:
        return None
    return context * max(len(token_text(token)) for token in range(vocabulary))


# ContextCheck's pieces: the first is this many characters per token of room, which tokenizes only a little more
# than it must of the densest common text ("a a a ...", two characters a token) before counting past the context;
# wordier text takes a few more, smaller pieces. A cut may split a word (or, for some tokenizers, add a space marker),
# which can add a few tokens that the whole text does not have: each cut is allowed CUT_SLACK of them.
PIECE_CHARS_PER_TOKEN = 2
MIN_PIECE_CHARS = 4096
CUT_SLACK = 4


class ContextCheck:
    """Refuses a prompt with more tokens than the engine's context holds, at the cost of tokenizing no more of it
    than it takes to count past the context (a 1 MB prompt of half a million tokens: about 65,000 characters).

    The engine tokenizes the prompt anyway when the strategy opens it, and refuses it then; but a prompt of a million
    characters costs the tokenizer about half a second of a core, which hostile clients can ask for in a loop. Pieces
    are counted one after the other, each sized to the room left, and cut before a run of spaces where they have one
    (a word boundary for BPE tokenizers, so the pieces' tokens add up to the whole's). Pieces are tokenized off the
    event loop, one check at a time, so that a burst of long prompts takes at most one core from decoding.
    """

    def __init__(self, n_ctx: int, tokenize):
        self.n_ctx, self.tokenize = n_ctx, tokenize
        self._one_at_a_time = asyncio.Semaphore(1)

    @classmethod
    def of(cls, engine: Engine) -> ContextCheck | None:
        """The check for ``engine``; None for one that does not expose its context and tokenizer (a remote server,
        which refuses long prompts itself)."""
        try:
            return cls(engine.n_ctx, engine.tokenize)
        except AttributeError:
            return None

    async def check(self, texts: list[str]) -> None:
        """Raise a 400 ``context_length_exceeded`` ``ApiError`` if ``texts`` (the request's messages) alone hold more
        tokens than the context; the strategy's prompt around them only adds to that."""
        text = "\n\n".join(texts)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # JSON may carry a lone surrogate ("\ud800"), which no tokenizer takes
            raise ApiError(400, f"the messages hold {text[exc.start]!r}, half of a UTF-16 surrogate pair, which is "
                                "not text", param="messages") from None
        if size <= self.n_ctx:
            return  # every token holds at least one byte
        await self._one_at_a_time.acquire()
        counting = asyncio.get_running_loop().run_in_executor(None, self.tokens_past_context, text)
        # The thread cannot be stopped: if the request is cancelled, the next check still waits for it to finish.
        counting.add_done_callback(lambda done: (self._one_at_a_time.release(), done.cancelled() or done.exception()))
        past = await asyncio.shield(counting)
        if past is not None:
            counted, chars = past
            raise ApiError(400, f"the messages have more tokens than the context holds ({counted} tokens in their "
                                f"first {chars} characters; the context holds {self.n_ctx}, prompt and answer "
                                "together)", param="messages", code="context_length_exceeded")

    def tokens_past_context(self, text: str) -> tuple[int, int] | None:
        """(tokens counted, characters tokenized) once the count has passed the context; None if ``text`` fits."""
        counted, start, cuts = 0, 0, 0
        while start < len(text):
            tokens_to_pass = self.n_ctx + CUT_SLACK * (cuts + 1) - counted + 1  # if this piece is cut
            end = start + max(MIN_PIECE_CHARS, tokens_to_pass * PIECE_CHARS_PER_TOKEN)
            if end < len(text):
                end, cuts = _before_spaces(text, start, end), cuts + 1
            counted += len(self.tokenize(text[start:end]))
            if counted > self.n_ctx + CUT_SLACK * cuts:
                return counted, end
            start = end
        return None


def _before_spaces(text: str, start: int, end: int) -> int:
    """Where to end the piece ``text[start:end]``: before its last run of spaces, else at ``end``."""
    space = text.rfind(" ", start + 1, end)
    while space > start + 1 and text[space - 1] == " ":
        space -= 1
    return space if space > start and text[space - 1] != " " else end
