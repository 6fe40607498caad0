"""Mixed voting on the fake engine and the real sandbox: reasoning and program branches in one vote, each kind's vote
reported."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.strategies import mix

from kind_engine import KindEngine, program


def run(engine, **options):
    return asyncio.run(mix.STRATEGY(engine, "What is 6 times 7?", params=SamplingParams(), seed=0, **options))


def test_both_kinds_vote_together_and_each_kind_reports_its_vote():
    engine = KindEngine([program("print(6 * 7)\n")], ["so \\boxed{42}", "it is \\boxed{41}"])
    result = run(engine, n=4)
    assert result.answer == "42" and result.votes == {"42": 3, "41": 1}
    assert [b.details["kind"] for b in result.branches] == ["program", "program", "cot", "cot"]
    assert result.branches[0].details["status"] == "ok" and result.branches[0].details["stdout"] == "42\n"
    assert result.details["kinds"] == {
        "program": {"branches": 2, "votes": {"42": 2}, "answer": "42"},
        "cot": {"branches": 2, "votes": {"42": 1, "41": 1}, "answer": "42"},
    }
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert "sandbox" in result.usage.stages
    assert engine.stats().live_branches == 0  # both prompts and every branch released


def test_the_share_sets_how_many_branches_write_programs():
    result = run(KindEngine([program("print(7)\n")], ["\\boxed{7}"]), n=4, program_share=0.25)
    assert [b.details["kind"] for b in result.branches] == ["program", "cot", "cot", "cot"]
    assert result.config["program_share"] == 0.25


def test_a_tie_goes_to_the_programs_answer():
    result = run(KindEngine([program("print(7)\n")], ["\\boxed{8}"]), n=2)
    assert result.votes == {"7": 1, "8": 1} and result.answer == "7"


def test_a_failing_program_abstains_and_its_tokens_count():
    result = run(KindEngine([program("print(1 / 0)\n")], ["\\boxed{8}"]), n=2)
    assert result.answer == "8" and result.details["kinds"]["program"]["votes"] == {}
    assert result.branches[0].details["status"] == "ZeroDivisionError"
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)


def test_one_budget_caps_both_kinds_together():
    engine = KindEngine([program("a = 1\nb = 2\nprint(a + b)\n")], ["one two three four five six \\boxed{3}"])
    result = run(engine, n=4, budget=12)
    assert result.usage.generated_tokens <= 12
    assert engine.stats().live_branches == 0


@pytest.mark.parametrize("options, message", [
    ({"n": 4, "program_share": 1.0}, "between 0 and 1"),
    ({"n": 4, "program_share": 0}, "between 0 and 1"),
    ({"n": 1}, "a branch of each kind"),
    ({"n": 4, "timeout": -1}, "timeout"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(PonderError, match=message):
        run(KindEngine([program("print(7)\n")], ["\\boxed{7}"]), **options)
