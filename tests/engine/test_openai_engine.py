"""The remote engine's own logic, fast: URL handling, chat templates, error mapping, retries, failover, dispatch.

Retries and failover need a server that misbehaves on demand, so these tests run a small scripted
``/v1/completions`` app on 127.0.0.1; generation itself is tested against a real llama.cpp server in
``test_openai_engine_model.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from live_server import LiveServer

from ponder.engine.base import PonderError, PromptTooLongError, SamplingParams, ScoreUnsupportedError, Usage
from ponder.engine.base import RemoteUnavailableError
from ponder.engine.remote import OpenAIEngine
from ponder.engine.remote.engine import _chat_formatter
from ponder.engine.remote.transport import TokenLogprobs, _api_root, _echo_aligned, _status_error
from ponder.prompts import math_messages
from ponder.server.process import free_port


class ScriptedCompletions:
    """An OpenAI-compatible app whose ``/v1/completions`` plays ``words`` (one chunk per word when streaming), with
    ``n`` choices if ``honours_n`` and a logprob of -0.25 per token if ``honours_logprobs`` and the request asks (with
    ``alternatives`` among each token's top logprobs; in the completions API's shape, or with ``logprobs_shape="chat"``
    in the chat API's, as llama.cpp's llama-server answers), after ``delay`` seconds, failing the next ``failures``
    calls with ``failure_status`` first, or breaking the connection after ``break_after`` words. A request sent whole
    gets the same words in one completion. Its prompts have one token per whitespace-separated word; like vLLM, its
    usage counts the end-of-sequence token, which streams no text."""

    def __init__(self, honours_n: bool = False, honours_logprobs: bool = False, logprobs_shape: str = "completions"):
        self.honours_n = honours_n
        self.honours_logprobs = honours_logprobs
        self.logprobs_shape = logprobs_shape
        self.words = ["The", " answer", " is", " 4", "."]
        self.alternatives: dict[str, float] = {}  # listed beside every token in top_logprobs
        self.failures, self.failure_status, self.delay = 0, 503, 0.0
        self.break_after: int | None = None  # words streamed before the connection breaks
        self.hang_s = 0.0  # a hung process: every endpoint (the model list too) answers this late
        self.max_n: int | None = None  # refuse more choices per request, as llama-server does beyond its slots
        self.cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens when set
        self.bodies: list[dict] = []
        self.app = FastAPI()

        @self.app.get("/v1/models")
        async def models():
            await asyncio.sleep(self.hang_s)
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "test"}]}

        @self.app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            await asyncio.sleep(self.delay + self.hang_s)
            if self.failures > 0:
                self.failures -= 1
                return JSONResponse({"error": {"message": "overloaded, try again"}}, status_code=self.failure_status)
            if self.max_n is not None and body.get("n", 1) > self.max_n:
                message = f"Field 'n': Value must be between 1 <= value <= {self.max_n}, but got {body['n']}"
                return JSONResponse({"error": {"code": 400, "message": message}}, status_code=400)
            n = body.get("n", 1) if self.honours_n else 1
            logprobs = self.honours_logprobs and bool(body.get("logprobs"))
            if body.get("stream"):
                return StreamingResponse(self._stream(n, body["max_tokens"], logprobs),
                                         media_type="text/event-stream")
            words = self.words[: body["max_tokens"]]  # sent whole: the words it would have streamed
            finish = "length" if len(self.words) >= body["max_tokens"] else "stop"
            return self._completion([self._choice(i, words, finish, logprobs) for i in range(n)],
                                    usage=(len(body["prompt"].split()), n * (len(words) + (finish == "stop"))))

    @property
    def hits(self) -> int:
        return len(self.bodies)

    def _choice(self, index: int, text: str | list[str], finish_reason: str | None, logprobs: bool) -> dict:
        tokens = text if isinstance(text, list) else [text] if text else []
        choice = {"index": index, "text": "".join(tokens), "finish_reason": finish_reason, "logprobs": None}
        if logprobs and self.logprobs_shape == "chat":
            choice["logprobs"] = {"content": [
                {"id": 0, "token": t, "logprob": -0.25,
                 "top_logprobs": [{"id": 0, "token": alt, "logprob": lp}
                                  for alt, lp in {t: -0.25, **self.alternatives}.items()]} for t in tokens]}
        elif logprobs:
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.25] * len(tokens),
                                  "top_logprobs": [{t: -0.25, **self.alternatives} for t in tokens],
                                  "text_offset": [0] * len(tokens)}
        return choice

    def _completion(self, choices: list[dict], usage: tuple[int, int] | None = None) -> dict:
        completion = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "scripted",
                      "choices": choices}
        if usage:
            completion["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                   "total_tokens": sum(usage)}
            if self.cached_tokens is not None:
                completion["usage"]["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return completion

    async def _stream(self, n: int, max_tokens: int, logprobs: bool):
        words = self.words[:max_tokens]
        finish = "length" if len(self.words) >= max_tokens else "stop"
        for k, word in enumerate(words):
            if k == self.break_after:
                raise ConnectionAbortedError("the server process died")
            for i in range(n):
                yield f"data: {json.dumps(self._completion([self._choice(i, word, None, logprobs)]))}\n\n"
                await asyncio.sleep(0)
        for i in range(n):
            yield f"data: {json.dumps(self._completion([self._choice(i, '', finish, logprobs)]))}\n\n"
        generated = n * (len(words) + (finish == "stop"))
        yield f"data: {json.dumps(self._completion([], usage=(3, generated)))}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture
def scripted():
    started = []

    def start(**options) -> tuple[ScriptedCompletions, LiveServer]:
        backend = ScriptedCompletions(**options)
        started.append(LiveServer(backend.app))
        return backend, started[-1]

    yield start
    for served in started:
        served.stop()


def test_base_urls_get_v1_when_they_have_no_path():
    assert _api_root("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert _api_root("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/v1"
    assert _api_root("http://h:1/proxy/v1") == "http://h:1/proxy/v1"
    with pytest.raises(PonderError, match="needs a scheme"):
        _api_root("127.0.0.1:8080")


def test_qwen_template_renders_like_the_bundled_gguf_template():
    # The prompt the in-process engine renders from the GGUF's own template for the same messages.
    expected = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?\nPlease reason step by step, and put your final answer within "
                "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert _chat_formatter("qwen2.5")(messages=math_messages("What is 2+2?")).prompt == expected
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _chat_formatter("qwen2.5")(messages=system).prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_from_a_file(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>")
    rendered = _chat_formatter(str(template))(messages=[{"role": "user", "content": "Hi"}]).prompt
    assert rendered == "[user] Hi\n>>"
    with pytest.raises(PonderError, match="neither a known name"):
        _chat_formatter(str(tmp_path / "missing.jinja"))


def test_echo_alignment_detects_logprobs_shifted_by_one():
    tokens = ["1", ",", " 2", ",", " 3", ","]
    values = [None] + [-0.1] * 5
    aligned = TokenLogprobs(tokens, values, [{}] + [{t: -0.1} for t in tokens[1:]])
    shifted = TokenLogprobs(tokens, values, [{t: -0.1} for t in tokens[1:]] + [{"x": -0.1}])
    assert _echo_aligned(aligned)
    assert not _echo_aligned(shifted)
    assert not _echo_aligned(None)


def _api_error(status: int, message: str):
    response = httpx.Response(status, request=httpx.Request("POST", "http://h/v1/completions"))
    return openai.APIStatusError(message, response=response, body={"error": {"message": message}})


def test_status_errors_map_to_clear_ponder_errors():
    server = SimpleNamespace(url="http://h/v1")
    too_long = _status_error(server, _api_error(400, "This model's maximum context length is 2048 tokens"), 0)
    assert isinstance(too_long, PromptTooLongError) and "maximum context length" in str(too_long)
    down = _status_error(server, _api_error(503, "overloaded"), 3)
    assert isinstance(down, RemoteUnavailableError) and "answered 503 (after 3 retries): overloaded" in str(down)
    refused = _status_error(server, _api_error(404, "no such model"), 0)
    assert type(refused) is PonderError and "refused the request (404): no such model" in str(refused)


def test_a_server_that_is_down_is_a_clear_error():
    port = free_port()
    with pytest.raises(RemoteUnavailableError, match=rf"cannot reach .*127.0.0.1:{port}/v1.*is it running\?"):
        OpenAIEngine([f"http://127.0.0.1:{port}"], "anything")


def test_an_unknown_model_names_what_is_served(scripted):
    _, served = scripted()
    with pytest.raises(PonderError, match="does not serve 'gpt-9'; it serves: scripted"):
        OpenAIEngine([served.url], "gpt-9")


def test_the_only_served_model_is_the_default(scripted):
    _, served = scripted()
    engine = OpenAIEngine([served.url], None)
    assert engine.model.name == "scripted" and engine.model.path == f"{served.url}/v1"
    engine.close()


def test_open_takes_only_the_served_model(scripted):
    _, served = scripted()
    engine = OpenAIEngine([served.url])
    root = asyncio.run(engine.open("a prompt", model="scripted"))
    assert root.model == "scripted"
    with pytest.raises(PonderError, match="serves 'scripted' .*not 'judge': one engine serves one remote model"):
        asyncio.run(engine.open("a prompt", model="judge"))
    engine.close()


def test_append_counts_what_the_server_counts_beyond_the_context(scripted):
    backend, served = scripted()
    engine = OpenAIEngine([served.url])

    async def run():
        usage = Usage()
        root = await engine.open("Q: 2+2? A:", usage)  # 3 tokens (one per word)
        sent = len(backend.bodies)
        await root.append(" Let us think.")  # the prefix now has 6
        assert len(backend.bodies) == sent and root.appended_tokens == 0  # an append sends nothing by itself
        (child,) = await root.fork(1)  # counts it first, once, so the child shares it
        await child.extend(SamplingParams(max_tokens=64))  # streamed
        await child.append(" Check:")
        await child.extend(SamplingParams(max_tokens=1))  # sent whole: its usage counts the append
        (unsent,) = await child.fork(1)
        await unsent.append(" never sent")
        unsent.release()
        return root, child, usage

    backend.bodies = []
    root, child, usage = asyncio.run(run())
    assert backend.bodies[1]["prompt"] == "Q: 2+2? A: Let us think." and backend.bodies[1]["max_tokens"] == 1
    assert root.text == " Let us think." and root.tokens == [-1] * 3 and root.appended_tokens == 3
    assert root.context_tokens == 6
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert streamed[0]["prompt"] == "Q: 2+2? A: Let us think."  # generation continues after the appended text
    assert len(backend.bodies) == 4  # open, the fork's count, the stream, the whole extend
    assert backend.bodies[3]["prompt"] == "Q: 2+2? A: Let us think.The answer is 4. Check:"
    assert child.text == " Let us think.The answer is 4. Check:The"
    # The server counts 10 words in the last prefix, the child held 6 + 5 generated tokens = 11 ("think." and "The"
    # retokenize as one word): text that retokenizes shorter than it was sampled adds 0 tokens, never fewer.
    assert child.appended_tokens == 3 and child.context_tokens == 12
    # 3 appended prompt tokens (the second append counted 0, the unsent one nothing); open and the fork's count each
    # generated one token, the stream 5 and its end token, the whole extend 1.
    assert usage.prompt_tokens == 6 and usage.generated_tokens == 1 + 1 + 6 + 1
    assert usage.models == {"scripted": {"prompt_tokens": 6, "generated_tokens": 9, "prompt_tokens_shared": 6 + 12}}
    with pytest.raises(PonderError, match="cannot append to a released branch"):
        root.release()
        asyncio.run(root.append("more"))


def test_the_servers_prefix_cache_hits_are_counted(scripted):
    backend, served = scripted()
    engine = OpenAIEngine([served.url])
    usage = Usage()
    asyncio.run(engine.open("a short prompt", usage))  # a server that does not say: nothing cached
    backend.cached_tokens = 2
    asyncio.run(engine.open("a short prompt", usage))
    assert usage.prompt_tokens == 6 and usage.prompt_tokens_cached == 2
    assert usage.models["scripted"]["prompt_tokens_cached"] == 2


def test_429_and_5xx_are_retried_with_backoff(scripted, monkeypatch):
    monkeypatch.setattr("ponder.engine.remote.transport.BACKOFF_S", 0.05)
    backend, served = scripted()
    engine = OpenAIEngine([served.url], retries=2)
    backend.bodies, backend.failures, backend.failure_status = [], 2, 429
    usage = Usage()
    root = asyncio.run(engine.open("a short prompt", usage))
    assert backend.hits == 3  # two refusals, then the answer
    assert root.context_tokens == 3 and usage.prompt_tokens == 3 and usage.generated_tokens == 1

    backend.bodies, backend.failures, backend.failure_status = [], 100, 503
    with pytest.raises(RemoteUnavailableError, match=r"answered 503 \(after 2 retries\): overloaded"):
        asyncio.run(engine.open("a prompt"))
    assert backend.hits == 3  # the first try and two retries


def test_requests_go_to_the_least_loaded_server_and_skip_one_that_is_down(scripted):
    (first, one), (second, two) = scripted(), scripted()
    engine = OpenAIEngine([one.url, two.url])
    first.delay = second.delay = 0.2
    first.bodies, second.bodies = [], []

    async def opens(k: int):
        return await asyncio.gather(*(engine.open("a prompt") for _ in range(k)))

    asyncio.run(opens(4))
    assert (first.hits, second.hits) == (2, 2)

    one.stop()
    started = time.perf_counter()
    roots = asyncio.run(opens(3))
    assert len(roots) == 3 and second.hits == 5
    assert time.perf_counter() - started < 2  # no backoff: the other server takes over at once
    assert engine.stats().live_branches == 7
    for root in roots:
        root.release()
    assert engine.stats().live_branches == 4

    two.stop()
    with pytest.raises(RemoteUnavailableError, match=rf"cannot reach .*{two.url}/v1.*is it running\?"):
        asyncio.run(opens(1))


async def three_siblings(engine: OpenAIEngine, stop_if=None, params=SamplingParams(max_tokens=64)):
    usage = Usage()
    root = await engine.open("Q: 2+2? A:", usage)
    branches = await root.fork(3)
    await asyncio.gather(*(b.extend(params, stop_if) for b in branches))
    for branch in [root, *branches]:
        branch.release()
    return branches, usage


def test_siblings_share_one_request_with_n_where_the_server_honours_it(scripted):
    backend, served = scripted(honours_n=True)
    engine = OpenAIEngine([served.url])
    assert engine._transport.servers[0].supports_n
    backend.bodies = []
    branches, usage = asyncio.run(three_siblings(engine))
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert len(streamed) == 1 and streamed[0]["n"] == 3
    assert [b.text for b in branches] == ["The answer is 4."] * 3
    assert all(b.finish_reason == "stop" and len(b.tokens) == 5 for b in branches)
    # 15 streamed tokens, the 3 end tokens the server counted but did not stream, the open request's token
    assert usage.generated_tokens == 15 + 3 + 1
    assert usage.prompt_tokens == 3 and usage.prompt_tokens_shared == 9


def test_self_consistency_sends_its_branches_as_one_request_with_n(scripted):
    from ponder.strategies import get_strategy

    backend, served = scripted(honours_n=True)
    engine = OpenAIEngine([served.url])
    backend.bodies = []
    result = asyncio.run(get_strategy("sc")(engine, "What is 2 + 2?", n=4, seed=7))
    assert [body.get("n") for body in backend.bodies if body.get("stream")] == [4]
    assert result.answer == "4" and len(result.branches) == 4
    backend.bodies = []  # a token budget is a per-token rule: each branch needs its own stream to be halted
    asyncio.run(get_strategy("sc")(engine, "What is 2 + 2?", n=4, seed=7, budget=100))
    assert len([body for body in backend.bodies if body.get("stream")]) == 4


def test_a_per_token_rule_gives_each_branch_its_own_request(scripted):
    backend, served = scripted(honours_n=True)
    engine = OpenAIEngine([served.url])
    backend.bodies = []
    branches, usage = asyncio.run(three_siblings(engine, stop_if=lambda b: len(b.tokens) >= 2))
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert len(streamed) == 3 and all("n" not in body for body in streamed)
    assert [b.text for b in branches] == ["The answer"] * 3
    assert all(b.finish_reason == "halted" for b in branches)


def test_without_n_each_branch_is_a_concurrent_request(scripted):
    from ponder.strategies import get_strategy

    backend, served = scripted(honours_n=False)
    engine = OpenAIEngine([served.url])
    assert not engine._transport.servers[0].supports_n
    backend.bodies = []
    branches, usage = asyncio.run(three_siblings(engine))
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert len(streamed) == 3 and all("n" not in body for body in streamed)
    assert [b.text for b in branches] == ["The answer is 4."] * 3
    assert usage.generated_tokens == 15 + 3 + 1  # each stream's usage counts its end token
    backend.bodies = []  # self-consistency's n samples become n requests of one choice each
    result = asyncio.run(get_strategy("sc")(engine, "What is 2 + 2?", n=4, seed=7))
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert len(streamed) == 4 and all("n" not in body for body in streamed)
    assert result.answer == "4" and len(result.branches) == 4


def test_only_n_is_probed_at_start_the_rest_on_first_need(scripted):
    from ponder.strategies import get_strategy

    backend, served = scripted()
    engine = OpenAIEngine([served.url])
    assert backend.bodies == [{"model": "scripted", "prompt": "1+1=", "max_tokens": 1, "temperature": 1.0, "n": 2}]
    (server,) = engine._transport.servers
    assert server.supports_logprobs is None and server.supports_echo_logprobs is None
    backend.bodies = []
    asyncio.run(get_strategy("sc")(engine, "What is 2 + 2?", n=2, seed=7))
    assert not any("logprobs" in body or "echo" in body for body in backend.bodies)  # majority votes need neither

    async def extend_with_logprobs():
        root = await engine.open("Q: 2+2? A:")
        try:
            await root.extend(SamplingParams(max_tokens=64, logprobs=True))
        finally:
            root.release()

    backend.bodies = []
    for _ in range(2):
        with pytest.raises(PonderError, match="needs token logprobs, which the remote server does not return"):
            asyncio.run(extend_with_logprobs())
    assert [body.get("logprobs") for body in backend.bodies] == [None, 1, None]  # open, the probe (once), open
    assert server.supports_logprobs is False

    async def score():
        root = await engine.open("Q: 2+2? A:")
        try:
            await root.score(" 4")
        finally:
            root.release()

    backend.bodies = []
    with pytest.raises(ScoreUnsupportedError, match=r"score\(\) needs prompt logprobs"):
        asyncio.run(score())
    assert [body.get("echo") for body in backend.bodies] == [None, True]
    assert server.supports_echo_logprobs is False


@pytest.mark.parametrize("shape", ["completions", "chat"])
def test_bon_self_verifies_by_one_generated_token_where_the_server_has_no_echo_logprobs(scripted, shape):
    from ponder.strategies import get_strategy
    from ponder.verifiers.llm import SELF_CHECK

    # Its echo logprobs are no use (one token, unaligned); "chat": logprobs as llama-server lists them.
    backend, served = scripted(honours_logprobs=True, logprobs_shape=shape)
    backend.alternatives = {" Yes": math.log(0.6), " No": math.log(0.2)}
    engine = OpenAIEngine([served.url])
    backend.bodies = []
    result = asyncio.run(get_strategy("bon")(engine, "What is 2 + 2?", n=2, seed=7, verifier="self"))
    assert engine._transport.servers[0].supports_echo_logprobs is False
    assert len([body for body in backend.bodies if body.get("echo")]) == 1  # probed once, then never asked again
    asked = [body for body in backend.bodies if body["prompt"].endswith(SELF_CHECK)]
    assert len(asked) == 2  # the verdicts, sent whole: their usage counts the appended question
    verdicts = [body for body in asked if not body.get("stream")]
    assert len(verdicts) == 2
    assert all(body["max_tokens"] == 1 and body["temperature"] == 0.0 and body["logprobs"] == 20 for body in verdicts)
    assert result.answer == "4" and result.votes == {"4": pytest.approx(0.75)}  # 0.6 / (0.6 + 0.2)
    assert result.usage.scored_tokens == 0


def test_a_branch_released_while_its_logprobs_are_probed_ends_cancelled(scripted):
    backend, served = scripted(honours_logprobs=True)
    engine = OpenAIEngine([served.url])

    async def run():
        root = await engine.open("Q: 2+2? A:")
        backend.delay = 0.3
        extending = asyncio.ensure_future(root.extend(SamplingParams(max_tokens=64, logprobs=True)))
        while not any(body.get("logprobs") for body in backend.bodies):
            await asyncio.sleep(0.01)
        root.release()  # the probe is still waiting for its answer
        return await extending

    branch = asyncio.run(run())
    assert branch.finish_reason == "cancelled" and branch.text == ""
    assert not any(body.get("stream") for body in backend.bodies) and engine.stats().live_branches == 0


@pytest.mark.parametrize("shape", ["completions", "chat"])
def test_branches_that_need_logprobs_together_share_one_probe_and_one_request(scripted, shape):
    backend, served = scripted(honours_n=True, honours_logprobs=True, logprobs_shape=shape)
    engine = OpenAIEngine([served.url])
    backend.bodies = []
    branches, _ = asyncio.run(three_siblings(engine, params=SamplingParams(max_tokens=64, logprobs=True)))
    probes = [body for body in backend.bodies if body.get("logprobs") and not body.get("stream")]
    streamed = [body for body in backend.bodies if body.get("stream")]
    assert len(probes) == 1 and engine._transport.servers[0].supports_logprobs
    assert len(streamed) == 1 and streamed[0]["n"] == 3 and streamed[0]["logprobs"] == 1
    assert all(b.token_logprobs == [-0.25] * 5 for b in branches)


def test_ponder_serve_answers_503_when_the_remote_is_down(scripted):
    from ponder.server import create_app

    backend, served = scripted()
    engine = OpenAIEngine([served.url], retries=0)
    front = LiveServer(create_app(engine))
    try:
        served.stop()
        response = httpx.post(f"{front.url}/v1/chat/completions",
                              json={"model": "scripted", "messages": [{"role": "user", "content": "2+2?"}]})
    finally:
        front.stop()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert "is it running?" in response.json()["error"]["message"]


async def extend_one_fork(engine: OpenAIEngine) -> None:
    """Open a prompt, fork one branch and extend it 64 tokens; both are released whatever the extend raises."""
    root = await engine.open("Q: 2+2? A:")
    (branch,) = await root.fork(1)
    try:
        await branch.extend(SamplingParams(max_tokens=64))
    finally:
        root.release()
        branch.release()


def test_a_connection_lost_mid_stream_is_a_clear_error(scripted):
    backend, served = scripted()
    engine = OpenAIEngine([served.url])
    backend.break_after = 2

    with pytest.raises(RemoteUnavailableError, match=f"lost the connection to {served.url}/v1 during generation"):
        asyncio.run(extend_one_fork(engine))
    assert engine.stats().live_branches == 0


def test_questions_in_their_own_event_loops_close_their_connections_cleanly(scripted, caplog):
    """``ponder.ask`` runs each question in a new event loop (``asyncio.run``). The connections a loop opened must be
    closed in that loop: a client left behind is closed by the garbage collector from whatever loop runs then, which
    fails on the dead loop's sockets and logs "Event loop is closed" tracebacks (seen between the questions of a
    long remote run)."""
    import gc

    from ponder.strategies import get_strategy

    _, served = scripted(honours_n=False)
    engine = OpenAIEngine([served.url])

    async def question(seed: int):
        gc.collect()  # the previous loop's clients, if still held, are collected here, inside a running loop
        await asyncio.sleep(0.05)
        return await get_strategy("sc")(engine, "What is 2 + 2?", n=2, seed=seed)

    with caplog.at_level("ERROR", logger="asyncio"):
        for seed in range(3):
            assert asyncio.run(question(seed)).answer == "4"
        engine.close()
        asyncio.run(question(3))
        gc.collect()
    engine.close()
    assert not [r for r in caplog.records if "Event loop is closed" in str(r.exc_info and r.exc_info[1])]


def test_hidden_states_are_a_typed_unsupported_error(scripted):
    from ponder.engine.base import HiddenUnsupportedError

    _, served = scripted()
    engine = OpenAIEngine([served.url], None)

    async def go():
        branch = await engine.open("q")
        try:
            await branch.hidden()
        finally:
            branch.release()

    with pytest.raises(HiddenUnsupportedError, match="returns no hidden states"):
        asyncio.run(go())
    engine.close()


def test_auto_over_a_remote_engine_breaks_ties_by_the_vote_and_refuses_the_probe(scripted, tmp_path):
    from kind_engine import make_profile
    from ponder.probes import ProbeError
    from ponder.strategies import STRATEGIES

    _, served = scripted()
    engine = OpenAIEngine([served.url], None)
    profile = str(make_profile().save(tmp_path / "profile.json"))

    def auto(**options):
        return asyncio.run(STRATEGIES["auto"](engine, "What is 2 + 2?", params=SamplingParams(max_tokens=8), seed=0,
                                              profile=profile, max_branches=2, **options))

    result = auto()  # the reply holds no program: the pair cannot agree, and the cap ends the run unsettled
    assert result.answer == "4" and result.details["stopped"] == "max branches"
    assert result.details["tiebreak"] == {"by": "vote"}  # no hidden states here: the vote answers
    with pytest.raises(ProbeError, match="no known sha256"):
        auto(tiebreak="probe")
    engine.close()


def test_a_stream_lost_mid_way_resumes_on_the_other_server(scripted):
    (first, one), (second, two) = scripted(), scripted()
    engine = OpenAIEngine([one.url, two.url])
    first.break_after, first.bodies, second.bodies = 2, [], []

    async def run():
        usage = Usage()
        root = await engine.open("Q: 2+2? A:", usage)
        (branch,) = await root.fork(1)
        await branch.extend(SamplingParams(max_tokens=64))
        root.release()
        branch.release()
        return branch, usage

    branch, usage = asyncio.run(run())
    # Two words from the first server, then the rest of the extend from the second, from the text so far.
    assert branch.text == "The answer" + "The answer is 4." and branch.finish_reason == "stop"
    resumed = second.bodies[-1]
    assert resumed["prompt"].endswith("Q: 2+2? A:The answer") and resumed["max_tokens"] == 62
    assert len(branch.tokens) == 2 + 5 and usage.generated_tokens == 1 + 2 + 6  # the open's token; the end token
    assert engine.faults["resumed"] == 1 and engine.stats().live_branches == 0


def test_a_stream_that_keeps_breaking_is_resumed_at_most_retries_times(scripted):
    backend, served = scripted()
    engine = OpenAIEngine([served.url], retries=2)
    backend.break_after = 1

    with pytest.raises(RemoteUnavailableError, match="resumed 2 times"):
        asyncio.run(extend_one_fork(engine))
    assert engine.faults["resumed"] == 2


def test_a_hung_server_is_abandoned_a_busy_one_waited_for(scripted, monkeypatch):
    monkeypatch.setattr("ponder.engine.remote.transport.PING_S", 0.3)
    (first, one), (second, two) = scripted(), scripted()
    engine = OpenAIEngine([one.url, two.url], stall_timeout=0.3)
    first.bodies, second.bodies = [], []
    first.delay = 1.0  # busy: silent for longer than stall_timeout, but it answers the ping
    asyncio.run(engine.open("a prompt"))
    assert (first.hits, second.hits) == (1, 0) and engine.faults["hung"] == 0

    first.delay, first.hang_s = 0.0, 3.0  # hung: silent, and the ping goes unanswered too
    started = time.perf_counter()
    root = asyncio.run(engine.open("a prompt"))
    assert time.perf_counter() - started < 2.0 and root.server.url == two.url + "/v1"
    assert engine.faults["hung"] == 1 and engine.faults["retries"] == 1
    first.hang_s = 0.0


def test_a_server_answering_503_is_set_aside(scripted):
    (first, one), (second, two) = scripted(), scripted()
    engine = OpenAIEngine([one.url, two.url])
    first.bodies, second.bodies, first.failures = [], [], 100
    for _ in range(3):
        asyncio.run(engine.open("a prompt"))
    assert (first.hits, second.hits) == (1, 3)  # one 503, retried on the other; then the other only
    assert engine.faults["retries"] == 1


def test_a_server_down_at_start_is_skipped_while_another_answers(scripted):
    backend, served = scripted()
    down = f"http://127.0.0.1:{free_port()}"
    engine = OpenAIEngine([down, served.url])
    root = asyncio.run(engine.open("a prompt"))
    assert root.server.url == served.url + "/v1" and engine.model.name == "scripted"
    with pytest.raises(RemoteUnavailableError, match="is it running"):
        OpenAIEngine([down])


def test_a_server_that_takes_fewer_choices_gets_smaller_requests(scripted):
    backend, served = scripted(honours_n=True)
    engine = OpenAIEngine([served.url])
    backend.max_n, backend.bodies = 2, []
    branches, usage = asyncio.run(three_siblings(engine))
    assert all(b.text == "The answer is 4." and b.finish_reason == "stop" for b in branches)
    streamed = [body.get("n", 1) for body in backend.bodies if body.get("stream")]
    assert streamed == [3, 2, 1]  # refused once, then as many as it takes
    assert usage.generated_tokens == 1 + 3 * 6
    branches, _ = asyncio.run(three_siblings(engine))  # remembered: no refusal the second time
    assert [body.get("n", 1) for body in backend.bodies if body.get("stream")][3:] == [2, 1]
