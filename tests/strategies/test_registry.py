"""The strategy registry: every strategy has a description and the shared signature, and asks with the prompt it is
given."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from recording_engine import RecordingEngine

from ponder.engine.base import PonderError, SamplingParams
from ponder.prompts import DEFAULT_PROMPT, MathPrompt
from ponder.strategies import STRATEGIES, get_strategy
from ponder.strategies.pal import program_messages

SMALL, LARGE = "qwen2.5-0.5b", "qwen2.5-1.5b"  # the two models of cascade, specreason and glimprouter
QUESTION = "What is 2+2?"
# Searches score steps with the logprob scorer here: the judge scorer opens its own chat on the judge model.
OPTIONS = {name: {"scorer": "logprob"} for name in ("beam", "dvts", "particles", "astar")}


def test_every_strategy_is_described():
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name and strategy.summary and "\n" not in strategy.summary


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_takes_the_shared_keywords(name):
    parameters = inspect.signature(STRATEGIES[name]).parameters
    assert list(parameters)[:2] == ["engine", "question"]
    for keyword in ("n", "params", "seed", "budget", "prompt"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[keyword].default is not inspect.Parameter.empty
    assert parameters["budget"].default is None
    assert parameters["prompt"].default == DEFAULT_PROMPT


def chats_opened(name: str, prompt: MathPrompt) -> list:
    engine = RecordingEngine(["\\boxed{4}"], name=SMALL, models={LARGE: ["\\boxed{4}"]})
    asyncio.run(STRATEGIES[name](engine, QUESTION, n=4, params=SamplingParams(max_tokens=16), seed=0, prompt=prompt,
                                 **OPTIONS.get(name, {})))
    assert engine.chats
    return engine.chats


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_asks_with_the_default_prompt_by_default(name):
    default = [DEFAULT_PROMPT.messages(QUESTION), program_messages(QUESTION)]  # the math prompt, pal's program one
    assert all(chat in default for chat in chats_opened(name, DEFAULT_PROMPT))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_system_message_reaches_every_chat_of_every_strategy(name):
    for chat in chats_opened(name, MathPrompt("You are terse.")):
        assert chat[0] == {"role": "system", "content": "You are terse."}
        assert [m["role"] for m in chat[1:]] == ["user"] and QUESTION in chat[1]["content"]


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(PonderError, match="adaptive, deepconf"):
        get_strategy("beam-of-light")


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"pal"}))  # pal writes its own prompt: see its tests
def test_a_template_reaches_every_strategy_that_asks_the_math_prompt(name):
    prompt = MathPrompt(template="Solve: {question}")
    chats = chats_opened(name, prompt)
    assert prompt.messages(QUESTION) in chats  # mix also opens pal's program prompt
    assert all(chat in (prompt.messages(QUESTION), program_messages(QUESTION)) for chat in chats)


def test_what_bench_and_replay_read_is_declared_by_the_strategies():
    assert [name for name, s in STRATEGIES.items() if s.records_tree] == ["beam", "dvts", "particles", "astar"]
    assert {name for name, s in STRATEGIES.items() if s.independent_samples} == {"sc", "pal"}  # maj@k, pass@k
    assert {name: s.temperature for name, s in STRATEGIES.items() if s.temperature is not None} == {"greedy": 0.0}
    assert STRATEGIES["pal"].chat(QUESTION, DEFAULT_PROMPT) == program_messages(QUESTION)
    assert "```" in STRATEGIES["pal"].branch_params(SamplingParams()).stop
    assert STRATEGIES["sc"].chat(QUESTION, DEFAULT_PROMPT) == DEFAULT_PROMPT.messages(QUESTION)


def test_a_strategys_options_are_the_keywords_of_its_run():
    assert list(STRATEGIES["adaptive"].options) == ["budget", "init", "step", "threshold", "rule", "early_exit"]
    assert list(STRATEGIES["greedy"].options) == ["budget"]
