"""The server's limits on hostile or broken clients, on the fake engine, behind the same uvicorn protocol as
``ponder serve``: oversized and slow bodies, trickled headers, unread streams, the per-client cap, counted fields,
the prompt's character limit, and a large request next to ``/health``."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest

from ponder.engine.base import PonderError
from ponder.engine.fake import FakeEngine
from ponder.server import ServerConfig, create_app
from ponder.server.guards import uvicorn_server
from test_server import QUESTION, SCRIPTS, PacedFakeEngine

USER = [{"role": "user", "content": QUESTION}]


class GuardedServer:
    """``create_app`` served by ``uvicorn_server`` (the protocol and deadlines of ``ponder serve``) in a thread."""

    def __init__(self, engine, **config):
        config = ServerConfig(**config)
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(create_app(engine, config), config, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start within 10 s"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

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
    server = serve(FakeEngine([" ".join(["w"] * words)]), send_timeout_s=0.5, max_per_client=1)
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
    assert server.post({"model": "fake", "messages": USER}).status_code == 200  # its slot is free again


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


def test_limit_options_are_checked():
    for bad, says in [({"max_per_client": 0}, "max_per_client must be at least 1"),
                      ({"max_body_bytes": 0}, "max_body_bytes must be at least 1"),
                      ({"max_prompt_chars": 0}, "max_prompt_chars must be at least 1"),
                      ({"max_stop": -1}, "max_stop must be 0 or more"),
                      ({"send_timeout_s": 0}, "send_timeout_s must be more than 0 seconds")]:
        with pytest.raises(PonderError, match=says):
            ServerConfig(**bad)
