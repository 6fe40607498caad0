"""The server's limits on hostile or broken clients, on the fake engine, behind the same uvicorn protocol as
``ponder serve``: oversized and slow bodies, trickled headers, unread streams, the per-client cap and start limit,
counted fields, the prompt's character and token limits, and a large request next to ``/health``."""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer

from ponder.engine.base import PonderError
from ponder.engine.fake import FakeEngine
from ponder.server import ServerConfig, create_app
from ponder.server.admission import StartLimit
from ponder.server.guards import CUT_SLACK, ContextCheck
from ponder.server.schemas import ApiError
from test_server import QUESTION, SCRIPTS, PacedFakeEngine, wait_for

USER = [{"role": "user", "content": QUESTION}]


class GuardedServer(LiveServer):
    """``create_app`` served with the protocol and deadlines of ``ponder serve`` (``uvicorn_server``) in a thread."""

    def __init__(self, engine, **config):
        config = ServerConfig(**config)
        super().__init__(create_app(engine, config), guards=config)

    def connect(self, *, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so that the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def post(self, body, *, source: str = "127.0.0.1", **kwargs) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=30) as client:
            return client.post(f"{self.url}/v1/chat/completions", json=body, **kwargs)


@pytest.fixture
def serve():
    servers = []

    def start(engine=None, **config) -> GuardedServer:
        servers.append(GuardedServer(engine or FakeEngine(SCRIPTS), **config))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def request_head(length: int, *, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds``; what it sent before is read and dropped."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


# ---- bodies ---------------------------------------------------------------------------------------------------------

def test_a_body_declared_too_large_is_refused_before_it_is_sent(serve):
    server = serve(max_body_bytes=1000)
    with server.connect() as sock:
        sock.sendall(request_head(10_000_000))  # the headers alone: the server must answer without the body
        status, _, body = read_response(sock)
    assert status == 413
    assert body["error"]["code"] == "request_too_large" and "1000 bytes" in body["error"]["message"]


def test_a_chunked_body_is_cut_at_the_limit(serve):
    server = serve(max_body_bytes=1000)
    chunks = iter([b'{"model": "fake", "messages": [{"role": "user", "content": "', b"x" * 2000, b'"}]}'])
    response = server.post(None, content=chunks)  # an iterator is sent chunked, with no Content-Length
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_slow_body_is_answered_408_and_the_connection_closed(serve):
    server = serve(body_timeout_s=0.5)
    with server.connect() as sock:
        sock.sendall(request_head(1000) + b'{"model": ')
        started = time.monotonic()
        status, headers, body = read_response(sock)
        waited = time.monotonic() - started
        assert closed_within(sock, 5)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert 0.4 < waited < 5


@pytest.mark.parametrize("field, count, limit, code", [
    ("messages", 17, "max_messages", "too_many_messages"),
    ("stop", 3, "max_stop", None),
])
def test_messages_and_stop_strings_are_counted(serve, field, count, limit, code):
    server = serve(**{limit: count - 1})
    body = {"model": "fake", "messages": USER, "stop": ["a"]}
    body[field] = USER * count if field == "messages" else ["a"] * count
    response = server.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == code
    assert f"at most {count - 1}" in error["message"] and f"got {count}" in error["message"]


def test_json_nested_too_deeply_is_a_400_not_a_crash(serve):
    server = serve()
    response = server.post(None, content=b'{"model": "fake", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json" and "nested too deeply" in response.text


def test_text_parts_of_one_message_are_bounded(serve):
    server = serve()
    parts = [{"type": "text", "text": "x"}] * 65
    response = server.post({"model": "fake", "messages": [{"role": "user", "content": parts}]})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages.0.content")


# ---- the prompt's characters ------------------------------------------------------------------------------------

class CountingFakeEngine(FakeEngine):
    """Counts the prompts opened; with ``vocabulary``, exposes a context size and tokens, as the in-process engine
    does, so that the server derives its character limit."""

    def __init__(self, scripts, *, vocabulary: list[str] | None = None, n_ctx: int = 0):
        super().__init__(scripts)
        self.opened = 0
        if vocabulary is not None:
            self.n_ctx, self.n_vocab, self.token_text = n_ctx, len(vocabulary), vocabulary.__getitem__

    async def open(self, prompt, usage=None, *, model=None):
        self.opened += 1
        return await super().open(prompt, usage, model=model)


def test_a_prompt_over_the_character_limit_never_reaches_the_engine(serve):
    engine = CountingFakeEngine(SCRIPTS)
    server = serve(engine, max_prompt_chars=100)
    response = server.post({"model": "fake", "messages": [{"role": "user", "content": "x" * 101}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "101 characters" in error["message"] and "at most 100" in error["message"]
    assert engine.opened == 0
    assert server.post({"model": "fake", "messages": USER}).status_code == 200


def test_the_default_character_limit_is_the_context_times_the_longest_token(serve):
    engine = CountingFakeEngine(SCRIPTS, vocabulary=["a", "bcd", ""], n_ctx=10)
    server = serve(engine)
    too_long = server.post({"model": "fake", "messages": [{"role": "user", "content": "x" * 31}]})
    assert too_long.json()["error"]["message"].endswith("at most 30")  # 10 tokens of at most 3 characters
    assert server.post({"model": "fake", "messages": [{"role": "user", "content": "x" * 30}]}).status_code == 200
    assert engine.opened == 1


# ---- the prompt's tokens ---------------------------------------------------------------------------------------

def word_tokens(text: str) -> list[str]:
    """A tokenizer that, like the BPE ones, starts a token at a space before a word: 'a b' -> ['a', ' b']."""
    return re.findall(r" ?\S+|\s+(?!\S)|\s+", text)


class TokenizingFakeEngine(CountingFakeEngine):
    """The fake engine with a context size and a tokenizer, as the in-process engine has (so that the server checks
    prompts against the context), counting the characters it is asked to tokenize."""

    def __init__(self, scripts, *, n_ctx: int):
        super().__init__(scripts)
        self.n_ctx, self.tokenized_chars = n_ctx, 0

    def tokenize(self, text: str) -> list[str]:
        self.tokenized_chars += len(text)
        return word_tokens(text)


def test_a_prompt_past_the_context_is_refused_after_tokenizing_a_prefix_only(serve):
    engine = TokenizingFakeEngine(SCRIPTS, n_ctx=10_000)
    server = serve(engine)
    huge = "a " * 200_000  # 200,000 tokens, twenty times the context
    response = server.post({"model": "fake", "messages": [{"role": "user", "content": huge}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "the context holds 10000" in error["message"]
    assert engine.opened == 0
    assert 20_000 <= engine.tokenized_chars < 0.1 * len(huge)  # a little more than 10,000 tokens' worth of it


def test_a_long_prompt_that_fits_is_answered(serve):
    engine = TokenizingFakeEngine(SCRIPTS, n_ctx=10_000)
    server = serve(engine)
    long_words = "antidisestablishmentarianism " * 9_000  # 261,000 characters, 9,000 tokens
    response = server.post({"model": "fake", "messages": [{"role": "user", "content": long_words}]})
    assert response.status_code == 200 and engine.opened == 1
    assert engine.tokenized_chars == len(long_words)  # counted through to its end, in pieces


@pytest.mark.parametrize("words", [9_990, 10_000])
def test_the_pieces_of_a_prompt_that_fits_add_up_to_no_more_than_the_context(words):
    """Cuts before spaces make the pieces' tokens add up to the whole's: a prompt of up to the context's size, in
    words of many lengths, cut dozens of times, is never refused; one past it by more than the cuts' allowance is."""
    vocabulary = ["x" * length for length in range(1, 40)]
    text = " ".join(vocabulary[i * 7 % len(vocabulary)] for i in range(words))
    check = ContextCheck(10_000, word_tokens)
    assert len(word_tokens(text)) == words
    assert check.tokens_past_context(text) is None
    over = text + " y" * (1 + CUT_SLACK * 100)
    counted, chars = check.tokens_past_context(over)
    assert counted == len(word_tokens(over[:chars])) > 10_000


def test_text_without_spaces_is_cut_where_it_must_be():
    check = ContextCheck(1_000, lambda text: [text[i:i + 3] for i in range(0, len(text), 3)])
    counted, chars = check.tokens_past_context("x" * 1_000_000)
    assert counted > 1_000 and chars < 10_000


def test_a_lone_surrogate_is_a_400_not_a_crash(serve):
    server = serve(TokenizingFakeEngine(SCRIPTS, n_ctx=1_000))
    body = b'{"model": "fake", "messages": [{"role": "user", "content": "half a pair: \\ud800"}]}'
    response = server.post(None, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages" and "surrogate" in response.text


def test_large_allowed_requests_do_not_hold_up_health(serve):
    """Requests near the body limit (a long prompt, answered; thousands of tiny messages, refused for their count)
    keep /health answering: its worst latency under them stays within a generous bound of its quiet worst."""
    server = serve(FakeEngine(SCRIPTS, kv_cells=10**6))
    limit = ServerConfig().max_body_bytes
    long_prompt = {"model": "sc-2/fake", "messages": [{"role": "user", "content": "word " * (limit // 6)}]}
    many_messages = {"model": "fake", "messages": [{"role": "system", "content": "x"}] * (limit // 40)}
    bodies = [json.dumps(body).encode() for body in (long_prompt, many_messages)]
    assert all(limit * 0.8 < len(body) <= limit for body in bodies)

    def health_latencies(seconds: float) -> list[float]:
        latencies, end = [], time.monotonic() + seconds
        with httpx.Client() as client:
            while time.monotonic() < end:
                started = time.perf_counter()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        return latencies

    quiet = health_latencies(1.0)
    statuses, stop = [], threading.Event()

    def send(body: bytes) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post(f"{server.url}/v1/chat/completions", content=body,
                                            headers={"content-type": "application/json"}).status_code)

    senders = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for sender in senders:
        sender.start()
    try:
        loaded = health_latencies(2.0)
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    assert {200, 400} <= set(statuses) <= {200, 400}
    assert max(loaded) < max(quiet) + 0.5, (max(quiet), max(loaded))


# ---- slow and broken connections --------------------------------------------------------------------------------

def test_a_connection_that_trickles_its_headers_is_dropped(serve):
    server = serve(header_timeout_s=0.5)
    with server.connect() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        started = time.monotonic()
        try:
            while time.monotonic() - started < 5:  # a header line every 0.1 s: data keeps coming, slowly
                sock.sendall(b"X-Slow: yes\r\n")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        dropped_after = time.monotonic() - started
        assert closed_within(sock, 1)
    assert 0.4 < dropped_after < 3
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_client_that_stops_reading_its_stream_is_dropped_and_its_request_freed(serve):
    words = 30_000  # one event per word: megabytes of events, more than the socket buffers hold
    server = serve(FakeEngine([" ".join(["w"] * words)]), send_timeout_s=0.5, max_per_client=1, client_burst=1)
    body = json.dumps({"model": "greedy/fake", "messages": USER, "max_tokens": words, "stream": True}).encode()
    with server.connect(receive_buffer=4096) as sock:
        sock.sendall(request_head(len(body)) + body)
        time.sleep(3)  # read nothing
        received = b""
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in received  # the server gave up on the stream
    # Its place under max_per_client is free again (not the cap's 429), and the stream it threw away spent its token.
    assert server.post({"model": "fake", "messages": USER}).json()["error"]["code"] == "rate_limit_exceeded"


def server_end(server_port: int, client_port: int) -> int | None:
    """Bytes the server's end of the connection from ``client_port`` has queued to send (unsent or unacknowledged),
    in any TCP state; None when the server holds no end of it any more (Linux's /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, _, queues = line.split()[1:5]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[0], 16)
    return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's sockets from /proc/net/tcp")
def test_an_unread_answer_that_fits_the_socket_buffers_is_let_go_too(serve):
    """An answer of a few hundred kB goes into the kernel's buffers at once, so the server's transport never stalls;
    the kernel still gives up on it send_timeout after the client's window closed, instead of in minutes."""
    words = 2_000  # about 300 kB of events: more than the client's window, less than the kernel's send buffer
    server = serve(FakeEngine([" ".join(["w"] * words)]), send_timeout_s=0.5)
    body = json.dumps({"model": "greedy/fake", "messages": USER, "max_tokens": words, "stream": True}).encode()
    with server.connect(receive_buffer=4096) as sock:
        sock.sendall(request_head(len(body)) + body)
        client_port = sock.getsockname()[1]
        wait_for(lambda: (server_end(server.port, client_port) or 0) > 100_000)  # the answer waits, unread
        queued_at = time.monotonic()
        wait_for(lambda: server_end(server.port, client_port) is None, timeout=10)
        assert time.monotonic() - queued_at < 5
    assert server.post({"model": "fake", "messages": USER}).status_code == 200


# ---- the per-client cap -------------------------------------------------------------------------------------------

def test_the_per_client_cap_answers_429_with_retry_after(serve):
    server = serve(PacedFakeEngine(["word " * 40], delay=0.02), max_per_client=1)
    body = {"model": "sc-2/fake", "messages": USER, "max_tokens": 40}
    first = threading.Thread(target=server.post, args=(body,))
    first.start()
    time.sleep(0.3)  # the first request is running
    refused = server.post(body)
    other_client = server.post(body, source="127.0.0.2")
    first.join()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_requests_from_client"
    assert other_client.status_code == 200  # another address has its own allowance
    assert server.post(body).status_code == 200  # and the first client's is back once its request ended


def test_health_and_metrics_are_not_counted_against_a_client(serve):
    server = serve(PacedFakeEngine(["word " * 40], delay=0.02), max_per_client=1)
    first = threading.Thread(target=server.post, args=({"model": "sc-2/fake", "messages": USER},))
    first.start()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    first.join()


# ---- the per-client start limit -----------------------------------------------------------------------------------

def abandon(server: GuardedServer, body: dict, *, source: str = "127.0.0.1") -> None:
    """Send ``body`` from ``source``, wait until its run decodes, and reset the connection (as a client that gives
    up mid-stream does)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0)) as sock:
        sock.sendall(request_head(len(data)) + data)
        wait_for(lambda: live_branches(server) > 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
    wait_for(lambda: live_branches(server) == 0, timeout=1)  # its branches were freed at once


def live_branches(server: GuardedServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^ponder_live_branches (\S+)$", text, re.MULTILINE).group(1))


def test_runs_a_client_throws_away_are_limited_with_429_and_retry_after(serve):
    server = serve(PacedFakeEngine(["word " * 400], delay=0.02), client_burst=2, client_rate_per_min=6)
    body = {"model": "sc-2/fake", "messages": USER, "max_tokens": 400, "stream": True}
    abandon(server, body)
    abandon(server, body)
    refused = server.post({"model": "fake", "messages": USER})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 10  # a start comes back every 10 s
    assert server.post({"model": "fake", "messages": USER, "max_tokens": 4}, source="127.0.0.2").status_code == 200


def test_a_client_that_reads_its_answers_is_never_limited(serve):
    server = serve(PacedFakeEngine(SCRIPTS, delay=0.01), client_burst=1, client_rate_per_min=0.01)
    for stream in (False, True, False, True, False):  # back to back
        response = server.post({"model": "sc-2/fake", "messages": USER, "stream": stream})
        assert response.status_code == 200 and response.text.rstrip().endswith("[DONE]" if stream else "}")
    statuses = []
    at_once = [threading.Thread(target=lambda: statuses.append(server.post({"model": "sc-2/fake", "messages": USER})
                                                               .status_code)) for _ in range(4)]
    for thread in at_once:
        thread.start()
    for thread in at_once:
        thread.join()
    assert statuses == [200] * 4  # more at once than its burst


def test_a_prompt_too_long_for_the_context_spends_a_start(serve):
    server = serve(TokenizingFakeEngine(SCRIPTS, n_ctx=1_000), client_burst=1, client_rate_per_min=0.01)
    too_long = server.post({"model": "fake", "messages": [{"role": "user", "content": "a " * 5_000}]})
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert server.post({"model": "fake", "messages": USER}).status_code == 429


def test_the_servers_own_refusals_cost_the_client_nothing(serve):
    server = serve(PacedFakeEngine(["word " * 40], delay=0.02), max_running=1, max_queue=0, client_burst=1,
                   client_rate_per_min=0.01)
    body = {"model": "sc-2/fake", "messages": USER, "max_tokens": 40}
    running = threading.Thread(target=server.post, args=(body,), kwargs={"source": "127.0.0.2"})
    running.start()
    wait_for(lambda: live_branches(server) > 0)
    busy = [server.post(body).json()["error"]["code"] for _ in range(3)]
    running.join()
    assert busy == ["queue_full"] * 3  # not rate_limit_exceeded
    assert server.post(body).status_code == 200


def test_start_limit_refills_at_its_rate_up_to_its_burst():
    now = [0.0]
    limit = StartLimit(rate_per_min=6, burst=2, clock=lambda: now[0])
    limit.check("a")
    limit.spend("a")
    limit.spend("a")
    with pytest.raises(ApiError) as refused:
        limit.check("a")
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "10"}  # 1 token in 10 s
    now[0] = 7.0  # 0.7 of a token back: 3 s to go
    with pytest.raises(ApiError) as refused:
        limit.check("a")
    assert refused.value.headers == {"Retry-After": "3"}
    limit.check("b")  # another client has its own bucket
    now[0] = 1000.0  # refilled, but never beyond the burst
    for _ in range(3):  # three runs started at once, all thrown away: one more than the burst
        limit.check("a")
    for _ in range(3):
        limit.spend("a")
    with pytest.raises(ApiError) as refused:
        limit.check("a")
    assert refused.value.headers == {"Retry-After": "20"}  # back from -1 to 1

def test_limit_options_are_checked():
    for bad, says in [({"max_per_client": 0}, "max_per_client must be at least 1"),
                      ({"max_body_bytes": 0}, "max_body_bytes must be at least 1"),
                      ({"max_prompt_chars": 0}, "max_prompt_chars must be at least 1"),
                      ({"max_stop": -1}, "max_stop must be 0 or more"),
                      ({"send_timeout_s": 0}, "send_timeout_s must be more than 0 seconds"),
                      ({"client_burst": 0}, "client_burst must be at least 1"),
                      ({"client_rate_per_min": 0}, "client_rate_per_min must be more than 0")]:
        with pytest.raises(PonderError, match=says):
            ServerConfig(**bad)
