"""A reasoning model behind an OpenAI-compatible server: ``<think>`` traces, answer probes inside the thinking, an
early exit that closes it, and answers read after it. The server is scripted (the pattern of
``test_openai_engine.py``): its chat template opens the thinking in the prompt, as DeepSeek-R1's does, and it streams
a scripted trace from wherever the prompt leaves off; a prompt that ends with the probe gets the probe reply."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from live_server import LiveServer

from ponder.engine.base import SamplingParams
from ponder.engine.remote import OpenAIEngine
from ponder.stopping import PROBE
from ponder.strategies import sc

# DeepSeek-R1-Distill's template, reduced to what matters here: the assistant turn opens with "<think>\n".
R1_TEMPLATE = ("{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


class ThinkingCompletions:
    """``/v1/completions`` of a model that thinks: ``trace`` is what it writes after the prompt's ``<think>\\n``, one
    streamed token per piece; a prompt ending with the probe is answered with ``probe_reply``. Prompts count one token
    per whitespace-separated word. Every request body is kept in ``bodies``."""

    def __init__(self, trace: list[str], probe_reply: list[str]):
        self.trace = trace
        self.probe_reply = probe_reply
        self.positions = {"".join(trace[:k]): k for k in range(len(trace) + 1)}  # text written -> pieces written
        self.bodies: list[dict] = []
        self.app = FastAPI()

        @self.app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "r1-distill", "object": "model", "owned_by": "test"}]}

        @self.app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            prompt = body["prompt"]
            if body["max_tokens"] == 1 and not body.get("stream"):  # open, append counts and capability probes
                return _completion([{"index": 0, "text": "x", "finish_reason": "length"}],
                                   usage=(len(prompt.split()), 1))
            if prompt.endswith(PROBE):
                pieces = self.probe_reply
            else:
                pieces = self.trace[self.positions[prompt.split("<think>\n", 1)[1]]:]
            if not body.get("stream"):  # a short plain extend, sent whole
                sent = pieces[: body["max_tokens"]]
                finish = "length" if len(pieces) > body["max_tokens"] else "stop"
                return _completion([{"index": 0, "text": "".join(sent), "finish_reason": finish}],
                                   usage=(len(prompt.split()), len(sent)))
            return StreamingResponse(self._stream(pieces, body["max_tokens"]), media_type="text/event-stream")

    @property
    def probes(self) -> list[str]:
        """The prompts of the probe requests."""
        return [b["prompt"] for b in self.bodies if b["prompt"].endswith(PROBE)]

    @staticmethod
    async def _stream(pieces: list[str], max_tokens: int):
        sent = pieces[:max_tokens]
        finish = "length" if len(pieces) > max_tokens else "stop"
        for piece in sent:
            yield f"data: {json.dumps(_completion([{'index': 0, 'text': piece, 'finish_reason': None}]))}\n\n"
            await asyncio.sleep(0)
        yield f"data: {json.dumps(_completion([{'index': 0, 'text': '', 'finish_reason': finish}]))}\n\n"
        yield f"data: {json.dumps(_completion([], usage=(3, len(sent))))}\n\n"
        yield "data: [DONE]\n\n"


def _completion(choices: list[dict], usage: tuple[int, int] | None = None) -> dict:
    completion = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "r1-distill",
                  "choices": choices}
    if usage:
        completion["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return completion


@pytest.fixture
def thinking_server(tmp_path):
    template = tmp_path / "r1.jinja"
    template.write_text(R1_TEMPLATE)
    started = []

    def start(trace: list[str], probe_reply: list[str] = ("}",)) -> tuple[ThinkingCompletions, OpenAIEngine]:
        backend = ThinkingCompletions(trace, list(probe_reply))
        started.append(LiveServer(backend.app))
        return backend, OpenAIEngine([started[-1].url], chat_template=str(template))

    yield start
    for served in started:
        served.stop()


def thoughts(n: int) -> list[str]:
    return [f" thought{i}" for i in range(n)]


def run_sc(engine: OpenAIEngine, n: int = 2, max_tokens: int = 200, **options):
    return asyncio.run(sc.run(engine, "What is 6 * 7?", n=n, params=SamplingParams(max_tokens=max_tokens), seed=0,
                              **options))


def test_probes_go_inside_the_thinking_and_an_early_exit_closes_it(thinking_server):
    backend, engine = thinking_server(thoughts(100) + [" </think>", " \\boxed{41}"], probe_reply=["42}", " \\]"])
    result = run_sc(engine, early_exit="probe:every=8,window=2")
    assert result.answer == "42" and result.votes == {"42": 2}
    for branch in result.branches:
        assert branch.details["early_exit"]["exit"] == "probe"
        assert [p["at"] for p in branch.details["early_exit"]["probes"]] == [8, 16]
        assert branch.generated_tokens <= 24
        thinking, closed, after = branch.text.partition("</think>")
        assert closed and "\\boxed{42}" in after and "thought" not in after
    assert len(backend.probes) == 4
    for probe in backend.probes:  # each probe continues the thinking: the prompt's <think> is open
        assert "<｜Assistant｜><think>\n thought0 thought1" in probe and "</think>" not in probe
    assert result.usage.probe_tokens > 0
    # Besides the branches' own tokens, the remote engine counts the one token of the open request; the closing text
    # of the two exits is appended after the last request (no request evaluates it, so it costs nothing); the probes'
    # requests are all in probe_tokens.
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches) + 1
    engine.close()


def test_the_answer_is_read_after_the_thinking(thinking_server):
    trace = thoughts(5) + [" maybe", " \\boxed{3}?", " </think>", "\n\nThe", " answer", " is", " \\boxed{5}."]
    _, engine = thinking_server(trace)
    result = run_sc(engine)
    assert result.answer == "5" and result.votes == {"5": 2}
    engine.close()


def test_hesitant_probes_let_the_model_finish_its_thinking(thinking_server):
    trace = thoughts(30) + [" </think>", " \\boxed{5}"]
    backend, engine = thinking_server(trace, probe_reply=["42}", " Wait,", " no."])
    result = run_sc(engine, n=1, early_exit="probe:every=8")
    (branch,) = result.branches
    assert branch.answer == "5" and "exit" not in branch.details["early_exit"]
    assert branch.text.count("</think>") == 1
    engine.close()


def test_a_trace_cut_off_while_thinking_falls_back_to_the_whole_text(thinking_server):
    _, engine = thinking_server(thoughts(5) + [" so", " \\boxed{3}", " then"] + thoughts(50))
    result = run_sc(engine, n=1, max_tokens=20)
    (branch,) = result.branches
    assert branch.finish_reason == "length" and "</think>" not in branch.text and branch.answer == "3"
    engine.close()
