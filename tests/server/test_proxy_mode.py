"""ponder as a proxy: ``ponder serve --engine openai --base-url ...`` in front of a real llama.cpp server.

Three processes on 127.0.0.1, as a user runs them: llama-cpp-python's server with the bundled 0.5B, the counting
proxy of benchmarks/peers in front of it (to check ponder's usage against what the server was really asked), and
``ponder serve`` in front of that. Generations are short (48 tokens).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import openai
import pytest
from llama_cpp import Llama

from benchmarks.peers.counting_proxy import CountingProxy
from ponder.models import resolve_model
from ponder.server.process import ServerProcess, free_port
from test_openai_engine_model import skip_where_llama_cpp_server_cannot_run

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.model

MODEL = "qwen2.5-0.5b"
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def stack():
    path = resolve_model(MODEL).path
    skip_where_llama_cpp_server_cannot_run(path)
    vocab = Llama(path, vocab_only=True, verbose=False)
    llama_port, ponder_port = free_port(), free_port()
    llama = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--model_alias", MODEL, "--host",
             "127.0.0.1", "--port", str(llama_port), "--n_ctx", "2048", "--interrupt_requests", "false"]
    with ServerProcess(llama, llama_port, ready_path="/v1/models", stop_timeout_s=15) as upstream, \
            CountingProxy(upstream.url, count_tokens=lambda text: len(vocab.tokenize(text.encode(), add_bos=False,
                                                                                     special=True))) as proxy:
        serve = [sys.executable, "-m", "ponder.cli", "serve", "--engine", "openai", "--base-url",
                 proxy.base_url("ponder"), "--port", str(ponder_port)]
        with ServerProcess(serve, ponder_port, cwd=str(ROOT), env={**os.environ, "PONDER_API_KEY": ""}) as ponder:
            client = openai.OpenAI(base_url=f"{ponder.url}/v1", api_key="unused", max_retries=0, timeout=600)
            yield client, proxy


def test_the_served_model_and_its_strategies_are_listed(stack):
    client, _ = stack
    names = [m.id for m in client.models.list()]
    assert MODEL in names and f"sc/{MODEL}" in names and f"adaptive/{MODEL}" in names


def test_strategy_by_model_name_prefix_with_full_usage(stack):
    client, proxy = stack
    before = proxy.totals("ponder")
    completion = client.chat.completions.create(model=f"sc-3/{MODEL}", messages=QUESTION, max_tokens=48, seed=1)
    upstream = proxy.totals("ponder").minus(before)
    ponder = completion.model_extra["ponder"]
    assert completion.choices[0].message.content
    assert ponder["strategy"] == "sc" and len(ponder["branches"]) == 3
    usage = completion.usage
    generated = sum(b["generated_tokens"] for b in ponder["branches"])
    assert usage.completion_tokens == generated + 1  # plus the one token of the request that evaluated the prompt
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == ponder["usage"]["prompt_tokens"] > 20
    # What llama.cpp's server was asked: the prompt once, then one stream per branch (it ignores n), and the
    # completion tokens ponder reports are the ones it generated (recounted here with the model's tokenizer).
    assert upstream.requests == 1 + 3 and upstream.failed == 0
    assert abs(upstream.completion_tokens - usage.completion_tokens) <= 3


def test_strategy_by_the_ponder_field(stack):
    client, _ = stack
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=48, seed=2,
                                                extra_body={"ponder": {"strategy": "adaptive", "n": 4, "init": 2}})
    ponder = completion.model_extra["ponder"]
    assert ponder["strategy"] == "adaptive" and 2 <= len(ponder["branches"]) <= 4
    assert completion.usage.completion_tokens == sum(b["generated_tokens"] for b in ponder["branches"]) + 1


def test_streaming_ends_with_the_usage(stack):
    client, _ = stack
    stream = client.chat.completions.create(model=f"sc-2/{MODEL}", messages=QUESTION, max_tokens=48, seed=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"],
                                                                                                       ["length"])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens > 0 and usage.prompt_tokens > 20
