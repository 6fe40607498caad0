"""``ponder tune``: records every arm resumably, fits policies by replay with auto's own decisions, prints the
frontier, draws it and writes a profile auto reads; end to end on the fake engine and (``model``) on 3 real problems."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ponder.cli import build_parser, main
from ponder.engine.base import SamplingParams
from ponder.strategies.auto_profile import Policy, Profile
from ponder.strategies import STRATEGIES
from ponder.tune.command import tune_command
from ponder.tune.fitting import Draw, Problem, simulate
from ponder.tune.recording import ARMS
from kind_engine import KindEngine, make_profile, program

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bench_problems.jsonl"


def tune_args(tmp_path, *extra):
    return build_parser().parse_args(["tune", "--data", str(FIXTURE), "--dir", str(tmp_path / "rec"),
                                      "--reasoning-samples", "3", "--program-samples", "2", "--max-tokens", "64",
                                      "--holdout", "0.5", "--out", str(tmp_path / "profile.json"), *extra])


def fake_engine():
    # every program prints 42 and every reasoning says 42 or 7: whatever the problem, so some are right by chance
    return KindEngine([program("print(42)\n"), program("print(1 / 0)\n")],
                      ["so \\boxed{42}", "so \\boxed{7}", "so \\boxed{42}"], name="fake")


def test_tune_end_to_end_on_the_fake_engine(tmp_path, capsys):
    args = tune_args(tmp_path, "--plot", str(tmp_path / "frontier.png"))
    assert tune_command(args, engine_factory=fake_engine) == 0
    out = capsys.readouterr()
    assert "Pareto frontier on the 3 tuning problems" in out.out and "chosen policies" in out.out
    assert "profile written" in out.out
    for name, *_ in ARMS:
        assert (tmp_path / "rec" / f"fake-{name}.jsonl").is_file()
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    profile = Profile.read(tmp_path / "profile.json")
    assert set(profile.arms) == {name for name, *_ in ARMS} and profile.models() == ["fake"]
    assert set(profile.speed["fake"]["step_s"]) == {"1", "2", "4"}
    assert profile.tuned["tuning_problems"][2] == 3 and profile.tuned["holdout_problems"][2] == 3
    # auto reads what tune wrote
    engine = fake_engine()
    result = asyncio.run(STRATEGIES["auto"](engine, "What is 6 times 7?", n=1, params=SamplingParams(), seed=0,
                                            profile=str(tmp_path / "profile.json")))
    assert result.strategy == "auto" and result.details["profile"]["file"] == str(tmp_path / "profile.json")

    # resumable: everything is recorded, so with the speed of a profile no model is loaded at all
    def no_engine():
        raise AssertionError("the engine was loaded")

    again = tune_args(tmp_path, "--model", "fake", "--speed-from", str(tmp_path / "profile.json"))
    assert tune_command(again, engine_factory=no_engine) == 0
    assert "nothing to run" in capsys.readouterr().err


def test_the_replay_makes_autos_decisions():
    profile = make_profile()
    # one problem: greedy reasoning says 1 (class 0), the greedy program 2, sampled reasoning 1, 1, sampled program 2
    draws = {"reasoning-greedy": [Draw(0, 100)], "program-greedy": [Draw(1, 40, 0.5)],
             "reasoning-sampled": [Draw(0, 80), Draw(0, 120)], "program-sampled": [Draw(1, 30)]}
    problem = Problem("p", draws, {0}, {"reasoning": 50, "program": 60})
    agree = Problem("q", {**draws, "program-greedy": [Draw(0, 40)]}, {0}, {"reasoning": 50, "program": 60})
    policy = profile.policy("medium")
    out = simulate(policy, agree, profile)
    assert out.stopped == "agreed" and out.branches == 2 and out.tokens == 140 and out.correct
    # both decode together (width 2) for 40 steps, then the reasoning alone for 60; plus both prompts
    assert out.seconds == pytest.approx(40 * 0.015 + 60 * 0.01 + 110 * 0.001)
    out = simulate(policy, problem, profile)
    # 1:1 after the opening; the wave (sampled reasoning, sampled program) gives 1 then... 2 (program 30 tokens first)
    assert out.stopped in ("margin", "max branches") and out.branches >= 4
    capped = simulate(Policy(policy.open, policy.then, 2, 2.0, 2), problem, profile)
    assert capped.stopped == "max branches" and capped.branches == 2 and capped.correct  # a tie: the first opener


def test_a_cancelled_branch_is_charged_the_steps_it_ran():
    profile = make_profile()
    policy = Policy(("reasoning-greedy", "program-greedy"), ("reasoning-sampled", "program-sampled"), 2, 1.0, 4)
    draws = {"reasoning-greedy": [Draw(0, 10)], "program-greedy": [Draw(1, 10)],
             "reasoning-sampled": [Draw(0, 100)], "program-sampled": [Draw(0, 20)]}
    out = simulate(policy, Problem("p", draws, {0}, {}), profile)
    # the sampled program finishes at step 20 and settles the vote (margin 1): the sampled reasoning is cut there
    assert out.stopped == "margin" and out.tokens == 10 + 10 + 20 + 20 and out.correct


def test_a_bad_dataset_is_one_line(tmp_path, capsys):
    assert main(["tune", "--data", str(tmp_path / "missing.jsonl"), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no dataset" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q"}\n')
    assert main(["tune", "--data", str(bad), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing field 'answer'" in err and err.count("\n") == 1


def test_tune_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    assert "Record" in out and "--speed-from" in out and "--target-s" in out and "**" not in out


@pytest.mark.model
def test_tune_on_three_real_problems(tmp_path, capsys):
    args = build_parser().parse_args([
        "tune", "--data", "gsm8k", "--limit", "3", "--dir", str(tmp_path / "rec"), "--model", "qwen2.5-0.5b",
        "--reasoning-samples", "1", "--program-samples", "1", "--max-tokens", "32", "--holdout", "0.34",
        "--out", str(tmp_path / "profile.json")])
    assert tune_command(args) == 0
    profile = Profile.read(tmp_path / "profile.json")
    assert profile.models() == ["qwen2.5-0.5b"]
    steps = profile.speed["qwen2.5-0.5b"]["step_s"]
    assert 0 < steps["1"] < steps["4"] < 2
    assert json.loads((tmp_path / "profile.json").read_text())["tuned"]["tuning_problems"][2] == 2
