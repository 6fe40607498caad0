"""The remote engine against a real server: llama-cpp-python's ``python -m llama_cpp.server`` with the bundled 0.5B,
started on 127.0.0.1 for this module and stopped after it."""

from __future__ import annotations

import asyncio
import sys

import openai
import pytest

from live_server import LiveServer
from ponder.engine.base import PonderError, SamplingParams, Usage
from ponder.engine.remote import OpenAIEngine
from ponder.models import resolve_model
from ponder.server import create_app
from ponder.server.process import ServerProcess, free_port
from ponder.strategies import get_strategy

pytestmark = pytest.mark.model

QUESTION = "What is 12 + 30?"
MESSAGES = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


def skip_where_llama_cpp_server_cannot_run(path: str) -> None:
    """llama-cpp-python's own server loads models with llama.cpp's extra weight buffers and has no switch for them;
    where those die on this CPU (ponder's check: its AMX kernels on some virtual machines), the server would too."""
    from ponder.engine.cpu_check import use_extra_buffers

    if not use_extra_buffers(path):
        pytest.skip("llama-cpp-python's server cannot run on this CPU: the installed llama.cpp's extra weight buffers "
                    "(AMX) die here, and that server cannot turn them off (ponder can: ponder.engine.cpu_check)")


def llama_server_process(*extra: str) -> ServerProcess:
    port = free_port()
    path = resolve_model("qwen2.5-0.5b").path
    skip_where_llama_cpp_server_cannot_run(path)
    command = [sys.executable, "-m", "llama_cpp.server", "--model", path,
               "--model_alias", "qwen2.5-0.5b", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
               # llama-cpp-python cuts a stream short when another request arrives unless told not to
               "--interrupt_requests", "false", *extra]
    return ServerProcess(command, port, ready_path="/v1/models", stop_timeout_s=15)


@pytest.fixture(scope="module")
def llama_server():
    with llama_server_process() as server:
        yield server.url


@pytest.fixture(scope="module")
def remote(llama_server):
    engine = OpenAIEngine([llama_server], "qwen2.5-0.5b")
    yield engine
    engine.close()


def test_probe_finds_what_llama_cpp_python_honours(remote):
    (server,) = remote._transport.servers
    assert not server.supports_n  # it ignores n: one request per branch
    assert asyncio.run(remote._transport.supports("supports_logprobs"))  # probed lazily, the first time it is needed
    assert not asyncio.run(remote._transport.supports("supports_echo_logprobs"))  # its prompt logprobs are off by one


def test_self_consistency_through_the_remote_engine(remote):
    result = asyncio.run(get_strategy("sc")(remote, QUESTION, n=3, params=SamplingParams(max_tokens=48), seed=1))
    u = result.usage
    assert result.answer == "42"
    generated = sum(b.generated_tokens for b in result.branches)
    assert all(0 < b.generated_tokens <= 48 for b in result.branches)
    assert u.generated_tokens == generated + 1  # plus the one token of the request that evaluated the prompt
    assert u.prompt_tokens > 20 and u.prompt_tokens_shared == 3 * u.prompt_tokens
    assert remote.stats().live_branches == 0 and remote.stats().kv_cells_used == 0


def test_stop_strings_stop_if_and_release(remote):
    async def run():
        usage = Usage()
        root = await remote.open(MESSAGES, usage)
        a, b, c = await root.fork(3)
        greedy = SamplingParams(temperature=0.0, max_tokens=40)
        await asyncio.gather(a.extend(SamplingParams(temperature=0.0, max_tokens=40, stop=("5,",))),
                             b.extend(greedy, stop_if=lambda branch: len(branch.tokens) >= 6))
        task = asyncio.ensure_future(c.extend(greedy))
        while not c.tokens:
            await asyncio.sleep(0.01)
        c.release()  # mid-decode
        await task
        for branch in (root, a, b):
            branch.release()
        return root, a, b, c, usage

    root, a, b, c, usage = asyncio.run(run())
    assert a.text.startswith("1, 2, 3, 4, 5,") and a.finish_reason == "stop" and a.matched_stop == "5,"
    assert b.finish_reason == "halted" and len(b.tokens) == 6 and b.text.startswith("1, 2")
    assert c.finish_reason == "cancelled" and 0 < len(c.tokens) < 40
    assert usage.generated_tokens == 1 + len(a.tokens) + len(b.tokens) + len(c.tokens)
    assert root.context_tokens + len(b.tokens) == b.context_tokens
    assert remote.stats().live_branches == 0


def test_logprobs_match_the_in_process_engine(remote, real_engine):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=3)

    async def greedy(engine):
        root = await engine.open(MESSAGES)
        (branch,) = await root.fork(1)
        await branch.extend(params)
        root.release()
        branch.release()
        return branch

    here, there = asyncio.run(greedy(real_engine)), asyncio.run(greedy(remote))
    assert there.text == here.text
    assert there.token_logprobs == pytest.approx(here.token_logprobs, abs=0.05)
    assert there.confidences == pytest.approx(here.confidences, abs=0.3)


def test_score_is_refused_where_prompt_logprobs_are_wrong(remote):
    async def run():
        root = await remote.open(MESSAGES)
        try:
            return await root.score("1, 2, 3")
        finally:
            root.release()

    with pytest.raises(PonderError, match="score\\(\\) needs prompt logprobs"):
        asyncio.run(run())


def test_a_prompt_too_long_for_the_server(remote):
    with pytest.raises(PonderError, match="context"):
        asyncio.run(remote.open("word " * 3000))


def test_ponder_serve_over_the_remote_engine(remote):
    server = LiveServer(create_app(remote))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="sc-2/qwen2.5-0.5b", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, seed=3)
        ponder = completion.model_extra["ponder"]
        assert len(ponder["branches"]) == 2
        assert completion.usage.completion_tokens == sum(b["generated_tokens"] for b in ponder["branches"]) + 1
    finally:
        server.stop()
