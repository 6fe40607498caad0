"""The bench_peers counting proxy against a scripted upstream: exact counts per system, streamed and not, and the
requests it evens out (n, max_completion_tokens, the sampler)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from benchmarks.peers.counting_proxy import CountingProxy
from live_server import LiveServer

SAMPLER = {"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
WORD_S = 0.02  # the scripted server's time per streamed word (a 50-word stream lasts a second)


def words(text: str) -> int:
    return len(text.split())


class ScriptedServer:
    """An OpenAI-like server whose prompt costs one token per word and whose reply is ``max_tokens`` words.
    Streams carry one word per chunk; usage comes in a stream only when asked for (as vLLM does), never when the
    prompt says "llama" (as llama-cpp-python does)."""

    def __init__(self):
        self.received: list[dict] = []
        self.app = Starlette(routes=[Route("/v1/completions", self.complete, methods=["POST"]),
                                     Route("/v1/chat/completions", self.complete, methods=["POST"]),
                                     Route("/v1/models", self.models)])

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def complete(self, request: Request):
        body = json.loads(await request.body())
        self.received.append(body)
        chat = "messages" in body
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        reply = [f"w{i}" for i in range(body.get("max_tokens") or 16)]
        usage = {"prompt_tokens": words(prompt), "completion_tokens": len(reply),
                 "total_tokens": words(prompt) + len(reply)}

        def choice(text: str, finish: str | None = None) -> dict:
            part = {"delta": {"content": text}} if chat else {"text": text}
            return {"index": 0, "finish_reason": finish, **part}

        if not body.get("stream"):
            return JSONResponse({"choices": [choice(" ".join(reply), "length")], "usage": usage})

        async def events():
            for i, word in enumerate(reply):
                last = i == len(reply) - 1
                yield f"data: {json.dumps({'choices': [choice(' ' + word, 'length' if last else None)]})}\n\n"
                await asyncio.sleep(WORD_S)  # a model takes time per token: a client can leave mid-stream
            if (body.get("stream_options") or {}).get("include_usage") and "llama" not in prompt:
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def setup():
    scripted = ScriptedServer()
    upstream = LiveServer(scripted.app)
    proxy = CountingProxy(upstream.url, sampler=SAMPLER, count_tokens=words).start()
    yield scripted, proxy
    proxy.stop()
    upstream.stop()


def client(proxy: CountingProxy, system: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url(system), api_key="unused", max_retries=0)


def test_non_streamed_requests_are_counted_per_system_from_the_servers_usage(setup):
    scripted, proxy = setup
    a, b = client(proxy, "a"), client(proxy, "b")
    a.completions.create(model="m", prompt="one two three", max_tokens=5, temperature=0.7)
    a.chat.completions.create(model="m", messages=[{"role": "user", "content": "four five"}], max_tokens=2)
    b.completions.create(model="m", prompt="six", max_tokens=7)
    totals_a, totals_b = proxy.totals("a"), proxy.totals("b")
    assert (totals_a.requests, totals_a.prompt_tokens, totals_a.completion_tokens) == (2, 5, 7)
    assert (totals_b.requests, totals_b.prompt_tokens, totals_b.completion_tokens) == (1, 1, 7)
    assert [r.temperature for r in proxy.records if r.system == "a"] == [0.7, None]
    assert all(r.counted_by == "usage" for r in proxy.records)
    assert all(body.items() >= SAMPLER.items() for body in scripted.received)  # the same sampler everywhere


def test_a_models_listing_passes_through_unrecorded(setup):
    _, proxy = setup
    assert [m.id for m in client(proxy, "a").models.list()] == ["m"]
    assert proxy.totals("a").requests == 0


def test_streams_count_the_servers_usage_or_else_the_tokenizer(setup):
    _, proxy = setup
    with_usage = client(proxy, "vllm-like").completions.create(
        model="m", prompt="a b c d", max_tokens=6, stream=True, stream_options={"include_usage": True})
    streamed = [c for c in with_usage]
    assert "".join(c.choices[0].text for c in streamed if c.choices).split() == [f"w{i}" for i in range(6)]
    assert streamed[-1].usage.completion_tokens == 6
    without_usage = client(proxy, "llama-like").completions.create(model="m", prompt="llama b c", max_tokens=4,
                                                                   stream=True)
    assert len([c for c in without_usage]) == 4
    vllm_like, llama_like = proxy.totals("vllm-like"), proxy.totals("llama-like")
    assert (vllm_like.prompt_tokens, vllm_like.completion_tokens) == (4, 6)
    assert (llama_like.prompt_tokens, llama_like.completion_tokens) == (3, 4)
    assert [r.counted_by for r in proxy.records] == ["usage", "tokenizer"]


def test_a_stream_closed_early_counts_what_was_streamed(setup):
    _, proxy = setup
    with httpx.stream("POST", proxy.base_url("a") + "/completions",
                      json={"model": "m", "prompt": "llama", "max_tokens": 50, "stream": True}) as answer:
        lines = answer.iter_lines()
        received = [next(lines) for _ in range(6)]  # three events, each followed by a blank line
    assert sum(line.startswith("data:") for line in received) == 3
    deadline = time.monotonic() + 10
    while not proxy.records and time.monotonic() < deadline:  # the proxy notices the close on its own thread
        time.sleep(0.05)
    totals = proxy.totals("a")
    (record,) = proxy.records
    assert record.closed_early and totals.requests == 1 and 3 <= totals.completion_tokens < 50


def test_n_becomes_n_requests_with_distinct_seeds_and_one_merged_answer(setup):
    scripted, proxy = setup
    answer = client(proxy, "a").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x y"}], n=3, seed=10, max_completion_tokens=2)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.prompt_tokens == 6 and answer.usage.completion_tokens == 6
    assert sorted(body["seed"] for body in scripted.received) == [10, 11, 12]
    assert all("n" not in body and body["max_tokens"] == 2 and "max_completion_tokens" not in body
               for body in scripted.received)
    totals = proxy.totals("a")
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (3, 6, 6)


def test_a_streamed_n_merges_the_streams_under_their_indexes(setup):
    _, proxy = setup
    stream = client(proxy, "a").completions.create(model="m", prompt="p q", max_tokens=3, n=2, stream=True,
                                                   stream_options={"include_usage": True})
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts[0].split() == texts[1].split() == ["w0", "w1", "w2"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, 6)
    totals = proxy.totals("a")
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (2, 4, 6)
