"""One call path: the Python API, the CLI, the bench runner and the server all run a strategy through
``StrategyCall``, so options are checked and converted the same way whoever passes them."""

from __future__ import annotations

import asyncio

import pytest

import ponder
from ponder import options
from ponder.cli import main
from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.strategies import STRATEGIES, OptionError, StrategyCall

FOUR = ["\\boxed{4}"]


def test_an_unknown_option_is_the_same_clear_error_from_python_and_the_cli(capsys):
    with pytest.raises(OptionError) as raised:
        ponder.ask("What is 2+2?", "sc", engine=FakeEngine(FOUR), bogus=1)
    assert str(raised.value) == "strategy 'sc' does not take option 'bogus' (it takes: budget, weighting, early_exit)"
    assert isinstance(raised.value, PonderError) and raised.value.option == "bogus"

    assert main(["ask", "What is 2+2?", "--strategy", "sc", "--option", "bogus=1"]) == 2
    assert f"ponder: error: {raised.value}" in capsys.readouterr().err


def test_a_bad_option_value_is_the_same_clear_error_from_python_and_the_cli(capsys):
    with pytest.raises(OptionError, match="option init: Input should be a valid integer"):
        ponder.ask("What is 2+2?", strategy="adaptive", engine=FakeEngine(FOUR), init="abc")
    assert main(["ask", "hi", "--strategy", "adaptive", "--option", "init=abc"]) == 2
    assert "option init: Input should be a valid integer" in capsys.readouterr().err


def test_option_strings_are_converted_as_on_the_cli(monkeypatch, capsys):
    result = ponder.ask("What is 2+2?", strategy="adaptive", n=4, engine=FakeEngine(FOUR), threshold="0.9",
                        init="2")
    assert result.config["threshold"] == 0.9 and result.config["init"] == 2

    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(FOUR))
    assert main(["ask", "What is 2+2?", "--strategy", "adaptive", "--n", "4", "--option", "threshold=0.9",
                 "--option", "init=2", "--json"]) == 0
    assert '"threshold": 0.9, ' in capsys.readouterr().out


@pytest.mark.parametrize("question, n, strategy, message", [
    ("  ", 4, "sc", "the question is empty"),
    ("q", 0, "sc", "n must be at least 1, got 0"),
    ("q", 4, "telepathy", "unknown strategy 'telepathy'"),
])
def test_a_call_is_checked_before_it_runs(question, n, strategy, message):
    with pytest.raises(PonderError, match=message):
        StrategyCall(strategy, question, n=n)


def test_a_call_runs_its_strategy_with_the_options_converted():
    call = StrategyCall(STRATEGIES["short-m@k"], "q", n=4, params=SamplingParams(max_tokens=8), seed=3,
                        options={"m": "2"})
    assert call.options == {"m": 2}
    result = asyncio.run(call(FakeEngine(FOUR)))
    assert result.strategy == "short-m@k" and result.config["m"] == 2 and result.config["seed"] == 3


def test_the_recorded_config_holds_every_option_defaults_included():
    result = asyncio.run(STRATEGIES["bon"](FakeEngine(FOUR), "q", n=2, verifier="program"))
    # bon states the judge only for verifier=judge; the call fills in the rest from the run's arguments
    assert result.config["verifier"] == "program" and result.config["judge"] == "qwen2.5-1.5b"
    assert result.config["n"] == 2 and result.config["budget"] is None


def test_a_strategy_records_the_settings_it_really_used():
    result = asyncio.run(STRATEGIES["greedy"](FakeEngine(FOUR), "q", n=8, seed=1))
    assert result.config["temperature"] == 0.0 and result.config["n"] == 1 and result.config["seed"] is None
