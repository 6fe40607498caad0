"""The OpenAI-compatible server on the fake engine: a real uvicorn on 127.0.0.1, called with the official client."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest
from live_server import LiveServer
from recording_engine import RecordingEngine

from ponder.engine.base import EngineError, PonderError
from ponder.engine.fake import FakeEngine
from ponder.prompts import MathPrompt, math_messages
from ponder.server import ServerConfig, create_app
from ponder.server.cli import _listen
from ponder.strategies import STRATEGIES
from ponder.strategies.pal import program_messages

QUESTION = "What is 40 + 2?"
SCRIPTS = ["Add them: 40 + 2 = 42. \\boxed{42}", "Maybe \\boxed{7}", "So it is \\boxed{42}"]


class PacedFakeEngine(FakeEngine):
    """The fake engine at ``delay`` seconds per token, so that a request stays in flight long enough to interrupt."""

    def __init__(self, scripts, *, delay: float, **kwargs):
        super().__init__(scripts, **kwargs)
        self.delay = delay

    async def extend(self, branch, params, stop_if=None):
        for _ in range(params.max_tokens):
            await super().extend(branch, replace(params, max_tokens=1), stop_if)
            if branch.finish_reason != "length":
                return branch
            await asyncio.sleep(self.delay)
        return branch


class BrokenEngine(FakeEngine):
    async def open(self, prompt, usage=None):
        raise RuntimeError("secret internal detail")


class PonderServer(LiveServer):
    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(ponder_\S+) (\S+)$", text, re.MULTILINE)}


@pytest.fixture
def serve():
    servers = []

    def start(engine, **config) -> PonderServer:
        servers.append(PonderServer(create_app(engine, ServerConfig(**config))))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def ask(client: openai.OpenAI, model: str = "fake", content: str = QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kwargs)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- answers -------------------------------------------------------------------------------------------------------

def test_models_and_health(serve):
    server = serve(FakeEngine(SCRIPTS))
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == "fake"
    assert {f"{name}/fake" for name in STRATEGIES} <= set(ids)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "fake"}


def test_chat_completion_answers_with_the_voted_branch_and_honest_usage(serve):
    server = serve(FakeEngine(SCRIPTS))
    completion = ask(server.client(), model="sc-3/fake")
    ponder = completion.model_extra["ponder"]
    assert completion.choices[0].message.content == SCRIPTS[0]  # the first branch that voted for the winner
    assert completion.choices[0].finish_reason == "stop"
    assert ponder["answer"] == "42" and ponder["votes"] == {"42": 2, "7": 1}
    assert ponder["strategy"] == "sc" and ponder["n"] == 3 and len(ponder["branches"]) == 3
    generated = sum(b["generated_tokens"] for b in ponder["branches"])
    assert generated == sum(len(s.split()) for s in SCRIPTS)
    prompt = ponder["usage"]["prompt_tokens"]
    assert completion.usage.prompt_tokens == prompt > 0  # the prompt, once
    assert completion.usage.completion_tokens == generated  # every branch's tokens
    assert completion.usage.total_tokens == prompt + generated
    assert completion.usage.prompt_tokens_details.cached_tokens == 0  # the fake engine keeps no prefix cache
    assert ponder["usage"]["prompt_tokens_shared"] == 3 * prompt  # each fork reused the prompt
    assert "text" not in ponder["branches"][0]


def test_streaming_with_the_official_client(serve):
    server = serve(FakeEngine(SCRIPTS))
    stream = ask(server.client(), model="sc-3/fake", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPTS[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    ponder = finish[0].model_extra["ponder"]
    assert ponder["votes"] == {"42": 2, "7": 1}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == sum(b["generated_tokens"] for b in ponder["branches"])


def test_stream_ends_with_done(serve):
    server = serve(FakeEngine(SCRIPTS))
    body = {"model": "fake", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("model, extra, strategy, n", [
    ("fake", {}, "sc", 8),  # the server's defaults
    ("greedy/fake", {}, "greedy", 8),
    ("sc-5/fake", {}, "sc", 5),
    ("fake", {"ponder": {"strategy": "sc", "n": 4}}, "sc", 4),
    ("fake", {"n": 6}, "sc", 6),  # top-level n is the number of branches
    ("sc-5/fake", {"n": 1}, "sc", 5),  # n: 1 is the OpenAI default, not a request for one branch
    ("fake", {"ponder": {"budget": 5}}, "sc", 8),
])
def test_strategy_and_n_come_from_the_name_the_body_or_the_defaults(serve, model, extra, strategy, n):
    server = serve(FakeEngine(SCRIPTS))
    ponder = ask(server.client(), model=model, extra_body=extra).model_extra["ponder"]
    assert ponder["strategy"] == strategy and ponder["n"] == n
    assert len(ponder["branches"]) == (1 if strategy == "greedy" else min(n, ponder["config"]["budget"] or n))


def test_strategy_options_are_passed_typed(serve):
    server = serve(FakeEngine(SCRIPTS))
    ponder = ask(server.client(), model="adaptive/fake",
                 extra_body={"ponder": {"n": 6, "init": 2, "step": 1, "threshold": 0.8}}).model_extra["ponder"]
    assert ponder["strategy"] == "adaptive"
    assert ponder["config"]["init"] == 2 and ponder["config"]["threshold"] == 0.8


def test_sampling_fields_reach_every_branch(serve):
    server = serve(FakeEngine(SCRIPTS))
    ponder = ask(server.client(), model="sc-3/fake", temperature=0.3, top_p=0.5, max_tokens=5, stop="Maybe",
                 seed=7).model_extra["ponder"]
    config = ponder["config"]
    assert (config["temperature"], config["top_p"], config["max_tokens"], config["stop"], config["seed"]) == (
        0.3, 0.5, 5, ["Maybe"], 7)
    assert [b["generated_tokens"] for b in ponder["branches"]] == [5, 1, 4]  # max_tokens; the stop string


def test_the_client_system_message_becomes_the_prompts(serve):
    engine = RecordingEngine(SCRIPTS)
    server = serve(engine)
    completion = server.client().chat.completions.create(model="sc-3/fake", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION},
        {"role": "developer", "content": "Box the answer."}])
    assert completion.model_extra["ponder"]["answer"] == "42"
    server.client().chat.completions.create(model="pal-1/fake", messages=[  # pal's own program prompt takes it too
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}])
    ask(server.client())
    system, program, default = engine.chats
    assert system == [{"role": "system", "content": "You are terse.\n\nBox the answer."}, *math_messages(QUESTION)]
    assert program == program_messages(QUESTION, MathPrompt("You are terse."))
    assert default == math_messages(QUESTION)


def test_a_system_message_counts_toward_the_prompt_size_limit(serve):
    server = serve(FakeEngine(SCRIPTS), max_prompt_chars=len(QUESTION) + 5)
    assert ask(server.client()).model_extra["ponder"]["answer"] == "42"
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="fake", messages=[
            {"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"the system and user messages have {len(QUESTION) + 14} characters" in caught.value.body["message"]


def test_concurrent_requests_share_the_engine(serve):
    server = serve(PacedFakeEngine(["one two three four five six \\boxed{1}"], delay=0.05))

    async def two_requests():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}]) for model in ("sc-3/fake", "sc-4/fake")))

    seen, finished = [], threading.Event()

    def watch():
        while not finished.is_set():
            seen.append(server.metrics()["ponder_live_branches"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answers = asyncio.run(two_requests())
    finally:
        finished.set()
        watcher.join()
    assert [a.model_extra["ponder"]["answer"] for a in answers] == ["1", "1"]
    assert max(seen) == 3 + 4 + 2  # both requests' branches (and their prompts) were live at the same time
    assert server.metrics()["ponder_live_branches"] == 0


# ---- disconnects, queue, failures ------------------------------------------------------------------------------------

def test_a_client_that_disconnects_has_its_branches_cancelled(serve):
    server = serve(PacedFakeEngine(["word " * 400], delay=0.02))
    with pytest.raises(openai.APITimeoutError):
        ask(server.client(timeout=0.5), model="sc-6/fake", max_tokens=400)
    wait_for(lambda: server.metrics()["ponder_live_branches"] == 0)
    metrics = server.metrics()
    assert metrics["ponder_kv_cells_used"] == 0
    assert 0 < metrics["ponder_generated_tokens_total"] < 6 * 400  # it ran, and it was stopped early
    text = httpx.get(f"{server.url}/metrics").text
    assert 'ponder_requests_total{status="499"} 1.0' in text


def test_a_streaming_client_that_disconnects_is_cancelled_too(serve):
    server = serve(PacedFakeEngine(["word " * 400], delay=0.02))
    with pytest.raises(openai.APITimeoutError):
        list(ask(server.client(timeout=0.5), model="sc-3/fake", max_tokens=400, stream=True))
    wait_for(lambda: server.metrics()["ponder_live_branches"] == 0)
    assert 'ponder_requests_total{status="499"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_a_full_queue_answers_429(serve):
    server = serve(PacedFakeEngine(["word " * 40], delay=0.02), max_running=1, max_queue=0)
    body = {"model": "sc-2/fake", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40}
    first = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30))
    first.start()
    wait_for(lambda: server.metrics()["ponder_requests_running"] == 1)
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    first.join()
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "queue_full"


def test_requests_wait_in_the_queue_when_it_has_room(serve):
    server = serve(PacedFakeEngine(["a b c \\boxed{3}"], delay=0.01), max_running=1, max_queue=4)

    async def three():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model="sc-2/fake", messages=[{"role": "user", "content": QUESTION}]) for _ in range(3)))

    answers = asyncio.run(three())
    assert [a.model_extra["ponder"]["answer"] for a in answers] == ["3"] * 3
    assert max(a.model_extra["ponder"]["usage"]["queued_s"] for a in answers) > 0


def test_an_unexpected_failure_is_a_500_without_internals(serve):
    server = serve(BrokenEngine(SCRIPTS))
    response = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"model": "fake", "messages": [{"role": "user", "content": QUESTION}]})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "secret" not in response.text and "Traceback" not in response.text


def test_api_key(serve):
    server = serve(FakeEngine(SCRIPTS), api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(api_key="wrong"))
    response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert ask(server.client(api_key="s3cret")).model_extra["ponder"]["answer"] == "42"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health checks need no key


def test_busy_port_is_a_clear_error():
    taken = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(PonderError, match="cannot listen on 127.0.0.1"):
        _listen("127.0.0.1", taken.getsockname()[1])
    taken.close()


def test_bad_server_options_fail_before_anything_starts():
    with pytest.raises(PonderError, match="unknown strategy 'nope'"):
        ServerConfig(default_strategy="nope")
    with pytest.raises(PonderError, match="default n must be between 1 and 64, got 65"):
        ServerConfig(default_n=65)
    with pytest.raises(PonderError, match="max_queue >= 0, got 16 and -1"):
        ServerConfig(max_queue=-1)


# ---- bad input ------------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def fake_server():
    server = PonderServer(create_app(FakeEngine(SCRIPTS)))
    yield server
    server.stop()


@pytest.mark.parametrize("body, status, param, says", [
    ({"messages": USER}, 400, "model", "Field required"),
    ({"model": "fake"}, 400, "messages", "Field required"),
    ({"model": "fake", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "gpt-4", "messages": USER}, 404, "model", "not served here"),
    ({"model": "nope/fake", "messages": USER}, 400, "model", "unknown strategy 'nope'"),
    ({"model": "sc-0/fake", "messages": USER}, 400, "model", "between 1 and 64"),
    ({"model": "fake", "messages": USER, "ponder": {"strategy": "nope"}}, 400, "ponder.strategy", "unknown strategy"),
    ({"model": "sc-4/fake", "messages": USER, "ponder": {"n": 5}}, 400, "ponder.n", "conflicting n"),
    ({"model": "greedy/fake", "messages": USER, "ponder": {"strategy": "sc"}}, 400, "ponder.strategy",
     "conflicting strategy"),
    ({"model": "fake", "messages": USER, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": "fake", "messages": USER, "n": 65}, 400, "n", "less than or equal to 64"),
    ({"model": "fake", "messages": USER, "ponder": {"n": 1000}}, 400, "ponder.n", "less than or equal to 64"),
    ({"model": "fake", "messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "fake", "messages": USER, "max_tokens": 10**9}, 400, "max_tokens", "less than or equal to"),
    ({"model": "fake", "messages": USER, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"model": "fake", "messages": USER, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"model": "fake", "messages": USER, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "fake", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "fake", "messages": USER, "stop": [""]}, 400, None, "stop strings must not be empty"),
    ({"model": "fake", "messages": USER, "ponder": {"budget": 0}}, 400, "ponder.budget", "greater than or equal"),
    ({"model": "fake", "messages": USER, "ponder": {"colour": "red"}}, 400, "ponder.colour",
     "does not take option 'colour'"),
    ({"model": "adaptive/fake", "messages": USER, "ponder": {"threshold": "high"}}, 400, "ponder.threshold",
     "valid number"),
    ({"model": "fake", "messages": [{"role": "user", "content": "  "}]}, 400, "messages", "empty"),
    ({"model": "fake", "messages": USER + [{"role": "assistant", "content": "42"}] + USER}, 400, "messages",
     "exactly one user message"),
    ({"model": "fake", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "Input should be"),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages.0.content", "Input should be"),
])
def test_bad_requests_get_an_openai_style_4xx_naming_the_problem(fake_server, body, status, param, says):
    server = fake_server
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or (param and error["param"].startswith(param))
    assert says in error["message"]


def test_malformed_json(serve):
    server = serve(FakeEngine(SCRIPTS))
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "fake",',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert response.json()["error"]["message"].startswith("malformed JSON body")


def test_a_prompt_too_long_for_the_context(serve):
    server = serve(FakeEngine(SCRIPTS, kv_cells=20))
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server.client(), content="word " * 50)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "the context holds 20" in caught.value.body["message"]


def test_unknown_route_is_an_openai_style_404(serve):
    server = serve(FakeEngine(SCRIPTS))
    response = httpx.post(f"{server.url}/v1/completions", json={})
    assert response.status_code == 404 and "error" in response.json()


class FailingDecodeEngine(FakeEngine):
    """An engine whose decode breaks, the way the llama.cpp engine reports a failed llama_decode."""

    async def extend(self, branch, params, stop_if=None):
        raise EngineError("llama_decode returned -1 (secret internals)")


def test_an_engine_failure_is_a_500_not_the_clients_fault(serve):
    server = serve(FailingDecodeEngine(SCRIPTS))
    response = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"model": "fake", "messages": [{"role": "user", "content": QUESTION}]})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "secret" not in response.text


# ---- optional extras -------------------------------------------------------------------------------------------------

SERVER_PACKAGES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "httpx", "openai")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_cli_imports_neither_the_server_nor_the_remote_client():
    shown = run_python("import sys; from ponder.cli import build_parser; build_parser(); "
                       f"print(sorted(m for m in {SERVER_PACKAGES!r} if m in sys.modules))")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


@pytest.mark.parametrize("missing, argv, extra", [
    ("fastapi", ["serve"], "ponder[server]"),
    ("uvicorn", ["serve"], "ponder[server]"),
    ("openai", ["ask", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "What is 1 + 1?"],
     "ponder[remote]"),
])
def test_a_missing_extra_is_a_one_line_error_naming_it(missing, argv, extra):
    # None in sys.modules makes `import missing` fail as if the package were not installed.
    ran = run_python(f"import sys; sys.modules[{missing!r}] = None; from ponder.cli import main; "
                     f"sys.exit(main({argv!r}))")
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.count("\n") == 1 and f'pip install "{extra}"' in ran.stderr
