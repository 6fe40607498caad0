"""Program-aided reasoning on the fake engine and the real sandbox: programs run as their branches finish, the printed
values vote, failing programs abstain, adaptive stopping reads the programs' answers."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from ponder import options
from ponder.bench.datasets import load_dataset
from ponder.bench.runner import BenchConfig, read_results, run_bench
from ponder.cli import main
from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.prompts import MathPrompt
from ponder.programs import Outcome, running
from ponder.strategies import pal, sc

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bench_problems.jsonl"


def reply(program: str) -> str:
    """A whole reply as the model writes it: the prefilled fence, the program, the closing fence."""
    return f"{pal.REPLY_START}{program}```"


def run(engine, **options):
    options.setdefault("n", len(engine.scripts))
    return asyncio.run(pal.STRATEGY(engine, "What is 6 times 7?", params=SamplingParams(), seed=0, **options))


def test_programs_run_and_their_printed_values_vote():
    engine = FakeEngine([reply("eggs = 6\nprint(eggs * 7)\n"), reply("print(42.0)\n"),
                         reply("print('Total:', 40 + 1)\n")])
    result = run(engine)
    assert result.answer == "42" and result.votes == {"42": 2, "41": 1}
    first = result.branches[0]
    assert first.details == {"program": "eggs = 6\nprint(eggs * 7)\n", "stdout": "42\n", "status": "ok",
                             "error": None, "seconds": first.details["seconds"]}
    assert [b.answer for b in result.branches] == ["42", "42", "41"]
    assert result.details["status"] == {"ok": 3}
    assert result.usage.stages["sandbox"] >= sum(b.details["seconds"] for b in result.branches) * 0.99
    assert engine.stats().live_branches == 0  # the prompt and every branch released


def test_failing_programs_abstain_and_their_tokens_count():
    engine = FakeEngine([
        reply("print(1 / 0)\n"),
        reply("answer = 5\n"),  # prints nothing
        reply("print(True)\n"),  # prints no value
        reply("import time\ntime.sleep(30)\n"),
        reply("import sys\nsys.exit(3)\n"),
        reply("x = 1\n" * 200),  # cut off at max_tokens before its code block closes
        reply("print(5)\n"),
    ])
    result = run(engine, timeout=0.5)
    assert result.votes == {"5": 1} and result.answer == "5"
    statuses = [b.details["status"] for b in result.branches]
    assert statuses == ["ZeroDivisionError", "no output", "no answer", "timeout", "exit 3", "no program", "ok"]
    assert result.branches[0].details["error"] == "ZeroDivisionError: division by zero"
    assert result.branches[2].details["stdout"] == "True\n" and result.branches[2].answer is None
    assert result.branches[5].finish_reason == "length" and result.branches[5].details["program"] is None
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches) > 512


def test_programs_run_while_later_branches_still_decode(monkeypatch):
    engine = FakeEngine([reply("print(7)\n"), reply("x = 1\n" * 100 + "print(7)\n")])
    live_at_start = []

    async def observed(program, limits):
        live_at_start.append(engine.stats().live_branches)
        return await real_run_python(program, limits)

    real_run_python = running.run_python
    monkeypatch.setattr(running, "run_python", observed)
    result = run(engine)
    assert result.votes == {"7": 2}
    # The first program started while the prompt and the long branch were still live (the long one decoding);
    # the second once only the prompt was left.
    assert live_at_start == [2, 1]


def test_until_adaptive_stops_once_the_programs_agree():
    # The texts' last numbers all differ ("try 1", "try 2", ...): a rule reading the texts would never settle.
    engine = FakeEngine([reply(f"print(6 * 7)  # try {i}\n") for i in range(1, 17)])
    result = run(engine, n=16, until="adaptive")
    assert len(result.branches) == 4 and result.votes == {"42": 4}
    assert result.config["until"] == "adaptive" and result.config["init"] == 4


def test_until_adaptive_keeps_sampling_while_the_programs_disagree():
    engine = FakeEngine([reply("print(1)\n"), reply("print(2)\n")])
    result = run(engine, n=6, until="adaptive", init=2, step=2)
    assert len(result.branches) == 6 and result.votes == {"1": 3, "2": 3}


def test_a_settled_vote_cancels_programs_still_running():
    engine = FakeEngine([reply("print(7)\n")] * 4 + [reply("import time\ntime.sleep(30)\n")])
    start = time.monotonic()
    result = run(engine, n=5, until="adaptive", init=5, timeout=20)
    assert time.monotonic() - start < 10  # not the 20 s the sleeper was allowed
    assert result.votes == {"7": 4}
    assert result.branches[4].finish_reason == "stop" and result.branches[4].details["status"] == "not run"


def test_the_budget_caps_the_programs_tokens():
    engine = FakeEngine([reply("a = 1\nb = 2\nprint(a + b)\n")])
    result = run(engine, n=4, budget=20)
    assert result.usage.generated_tokens <= 20
    assert "not run" in result.details["status"]  # the branches the budget halted
    assert engine.stats().live_branches == 0


@pytest.mark.parametrize("outcome, status", [
    (Outcome("42\n", "", 0, False), "ok"),
    (Outcome("", "", 0, False), "no output"),
    (Outcome("True\n", "", 0, False), "no answer"),
    (Outcome("", "", None, True), "timeout"),
    (Outcome("", "Traceback (most recent call last):\n  ...\ndecimal.InvalidOperation: [<class 'x'>]\n", 1, False),
     "decimal.InvalidOperation"),
    (Outcome("", "", 137, False), "killed by SIGKILL"),  # the CPU limit, reported as 128 + 9
    (Outcome("", "usage: oops\n", 2, False), "exit 2"),
])
def test_status_of_a_run(outcome, status):
    assert pal.ProgramRun.of("program", outcome, 0.1).status == status


def test_bad_options_are_clear_errors():
    with pytest.raises(PonderError, match="until"):
        run(FakeEngine(["x"]), until="never")
    with pytest.raises(PonderError, match="timeout"):
        run(FakeEngine(["x"]), timeout=0)
    with pytest.raises(PonderError, match="threshold"):
        run(FakeEngine(["x"]), until="adaptive", threshold=2)


def test_a_system_message_applies_but_a_template_is_refused():
    engine = FakeEngine([reply("print(42)\n")])
    assert run(engine, prompt=MathPrompt("You write Python.")).answer == "42"
    with pytest.raises(PonderError, match="pal writes its own program prompt"):
        run(engine, prompt=MathPrompt(template="Solve: {question}"))


def test_ask_json_shows_each_program_its_output_and_status(monkeypatch, capsys):
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine([reply("print(6 * 7)\n"),
                                                                            reply("print(6 / 0)\n")]))
    assert main(["ask", "What is 6 times 7?", "--strategy", "pal", "--n", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "42" and result["strategy"] == "pal"
    assert [(b["details"]["program"], b["details"]["stdout"], b["details"]["status"]) for b in result["branches"]] \
        == [("print(6 * 7)\n", "42\n", "ok"), ("print(6 / 0)\n", "", "ZeroDivisionError")]
    assert "sandbox" in result["usage"]["stages"]


def test_other_strategies_report_no_branch_details():
    result = asyncio.run(sc.STRATEGY(FakeEngine(["\\boxed{7}"]), "q", n=2, seed=0))
    assert all("details" not in b for b in result.to_dict()["branches"])


def test_bench_records_the_programs_answers(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    half = [p for p in dataset.problems if p.id == "half"]
    engine = FakeEngine([reply("from fractions import Fraction\nprint(Fraction(1, 2))\n"), reply("print(0.5)\n"),
                         reply("1/0\n")])
    run_bench(engine, dataset, half, BenchConfig("pal", 3, SamplingParams(), seed=0), tmp_path / "pal.jsonl",
              progress=False)
    _, [record] = read_results(tmp_path / "pal.jsonl")
    assert record["correct"] and record["answer_classes"] == [{"answer": "1/2", "size": 2, "correct": True}]
    assert [b["answer_class"] for b in record["branches"]] == [0, 0, None]
    assert record["branches"][2]["details"]["status"] == "ZeroDivisionError"
