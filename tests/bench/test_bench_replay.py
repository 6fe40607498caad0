"""`ponder bench --replay`: strategies run on the branches an sc run recorded, with the real stopping code."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import ponder.options as options
from ponder.bench.replay import split_text
from ponder.bench.runner import read_results
from ponder.engine.base import PonderError
from ponder.engine.fake import FakeEngine
from test_bench_cli import FIXTURE, ponder

# Cycled over the branches of the recording: answers 7, 7, 18, none, 7, 18 ... of different lengths.
SCRIPTS = ["\\boxed{7}", "a b c d e f \\boxed{7}", "a b c d \\boxed{18}", "no answer at all here, none",
           "a \\boxed{7} b c d e f g h", "a b \\boxed{18} c"]


@pytest.fixture
def recording(tmp_path, monkeypatch) -> Path:
    """An sc run with n=6 over the fixture's 6 problems, recorded by the fake engine."""
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(SCRIPTS))
    path = tmp_path / "sc6.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--n", "6", "--max-tokens", "32", "--out", str(path)) == 0
    return path


def replay(tmp_path, recording, *extra: str, name: str = "replay.jsonl") -> tuple[dict, list[dict]]:
    out = tmp_path / name
    assert ponder("bench", "--data", FIXTURE, "--max-tokens", "32", "--replay", str(recording), "--out", str(out),
                  *extra) == 0
    return read_results(out)


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def test_replaying_the_recorded_strategy_gives_the_recording(tmp_path, recording):
    _, recorded = read_results(recording)
    header, replayed = replay(tmp_path, recording, "--n", "6")
    assert header["replay"]["source"] == str(recording) and header["replay"]["n"] == 6
    for r in replayed:
        old = by_id(recorded)[r["id"]]
        assert r["prediction"] == old["prediction"] and r["votes"] == old["votes"]
        assert r["usage"]["generated_tokens"] == old["usage"]["generated_tokens"]
        assert [b["text"] for b in r["branches"]] == [b["text"] for b in old["branches"]]
        assert [b["generated_tokens"] for b in r["branches"]] == [b["generated_tokens"] for b in old["branches"]]
        assert r["branches"][0]["mean_logprob"] == pytest.approx(old["branches"][0]["mean_logprob"])


def test_a_replayed_early_stop_charges_what_was_generated_until_the_stop(tmp_path, recording):
    _, recorded = read_results(recording)
    _, replayed = replay(tmp_path, recording, "--n", "6", "--strategy", "first-finish")
    for r in replayed:
        old = by_id(recorded)[r["id"]]
        first = min(old["branches"], key=lambda b: b["generated_tokens"])
        # All six decode in lockstep until the shortest ends; the other five are cancelled a few steps later (the
        # steps it takes the strategy to see the finish and cancel them).
        assert r["prediction"] == first["answer"]
        assert [b["finish_reason"] for b in r["branches"]].count("cancelled") == 5
        assert 6 * first["generated_tokens"] <= r["usage"]["generated_tokens"] <= 6 * (first["generated_tokens"] + 3)
        assert r["usage"]["generated_tokens"] < old["usage"]["generated_tokens"]


def test_replayed_adaptive_draws_the_recorded_branches_in_order(tmp_path, recording):
    _, replayed = replay(tmp_path, recording, "--n", "6", "--strategy", "adaptive", "--option", "init=2",
                         "--option", "step=2", "--option", "threshold=0.8")
    for r in replayed:
        # Waves of two: 7 and 7 agree (P = 0.875 >= 0.8), so the first wave settles every problem.
        assert [b["answer"] for b in r["branches"]] == ["7", "7"] and r["prediction"] == "7"


def test_replay_time_is_the_recorded_time_per_token(tmp_path, recording):
    started = time.time()
    header, replayed = replay(tmp_path, recording, "--n", "6", "--strategy", "first-finish")
    real = time.time() - started
    per_token = header["replay"]["seconds_per_token"]
    assert per_token > 0
    for r in replayed:
        # the recorded run's time for the tokens replayed, plus the (real) time the replay itself took; the record
        # rounds its times to milliseconds
        assert -0.002 <= r["finished"] - r["started"] - r["usage"]["generated_tokens"] * per_token <= real


@pytest.mark.parametrize("extra, message", [
    (["--n", "7"], "recorded 6 branches per problem; --n 7 needs more"),
    (["--n", "6", "--temperature", "0.3"], r"temperature 0.3 \(recorded 0.7\)"),
    (["--n", "6", "--seed", "1"], "recorded with --seed 0"),
    (["--n", "6", "--strategy", "deepconf"], "no per-token confidences"),
    (["--n", "6", "--option", "weighting=self-certainty"], "no per-token confidences"),
    (["--n", "2", "--strategy", "bon"], "cannot score text"),  # verifier=self scores on the generating model
    (["--n", "6", "--model", "qwen2.5-1.5b"], "drop --model"),
])
def test_what_a_recording_cannot_answer_is_refused(tmp_path, recording, extra, message):
    with pytest.raises(PonderError, match=message):
        replay(tmp_path, recording, *extra)
    assert not (tmp_path / "replay.jsonl").exists()  # a run that put no result in its new file leaves none


def test_a_replay_needs_the_recorded_problems_and_dataset(tmp_path, recording):
    header, records = read_results(recording)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(line) + "\n" for line in [header, *records[:2]]))
    with pytest.raises(PonderError, match="no recording of 4 of the selected problems"):
        replay(tmp_path, partial, "--n", "6")
    assert replay(tmp_path, partial, "--n", "6", "--limit", "2")[1]  # the recorded ones replay

    other = tmp_path / "other.jsonl"
    other.write_text(Path(FIXTURE).read_text().replace("What is", "What's"))
    with pytest.raises(PonderError, match="was recorded on .* not on other"):
        ponder("bench", "--data", str(other), "--n", "6", "--max-tokens", "32", "--replay", str(recording),
               "--out", str(tmp_path / "x.jsonl"))


def test_only_recordings_whose_branches_all_finished_replay(tmp_path, recording):
    _, short = replay(tmp_path, recording, "--n", "6", "--strategy", "first-finish", name="ff.jsonl")
    with pytest.raises(PonderError, match="did not end on their own \\(cancelled\\)"):
        replay(tmp_path, tmp_path / "ff.jsonl", "--n", "6", name="again.jsonl")


@pytest.mark.parametrize("text, count", [("one two three four", 2), ("one two", 5), ("", 3), ("a  b\n\nc", 4),
                                         ("x", 1), ("abc", 0)])
def test_split_text_gives_count_pieces_that_join_back(text, count):
    pieces = split_text(text, count)
    assert len(pieces) == count and "".join(pieces) == (text if count else "")


def test_report_labels_a_replay_and_draws_it_hollow(tmp_path, recording):
    from ponder.bench.report import load_runs, pareto_series, plot_pareto

    replay(tmp_path, recording, "--n", "6", "--strategy", "first-finish")
    runs, _ = load_runs([recording, tmp_path / "replay.jsonl"])
    series = {s.label: s for s in pareto_series(runs)}
    assert set(series) == {"sc n=6 maj@k", "first-finish n=6 (replay)"}
    assert series["first-finish n=6 (replay)"].replay and not series["sc n=6 maj@k"].replay
    figure = plot_pareto(runs, tmp_path / "p.png")
    for axes in figure.axes:
        (point,) = [c for c in axes.containers if c.get_label() == "first-finish n=6 (replay)"]
        assert point.lines[0].get_markerfacecolor() == "white"

    replay(tmp_path, recording, "--n", "6", "--option", "weighting=logprob", name="logprob.jsonl")
    runs, _ = load_runs([recording, tmp_path / "logprob.jsonl"])
    kinds = {s.label: s.kind for s in pareto_series(runs)}
    # the replayed sc is its own vote, a point: its maj@k curve would repeat the recording's
    assert kinds == {"sc n=6 weighting=majority maj@k": "curve", "sc n=6 weighting=logprob (replay)": "point"}


def test_a_cascade_replays_the_small_models_samples_and_the_large_models_greedy_run(tmp_path, monkeypatch):
    """Two recordings, one per model: the first four samples of the small model's sc run vote 7, 7, 18 and none
    (7 holds 2 of 4 < 0.75), so every problem escalates to the large model, whose greedy run answered 18."""
    small, large = tmp_path / "small-sc6.jsonl", tmp_path / "large-greedy.jsonl"
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(SCRIPTS, name="small"))
    assert ponder("bench", "--data", FIXTURE, "--n", "6", "--max-tokens", "32", "--out", str(small)) == 0
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(["a b \\boxed{18}"], name="large"))
    assert ponder("bench", "--data", FIXTURE, "--strategy", "greedy", "--n", "1", "--max-tokens", "32",
                  "--out", str(large)) == 0
    out = tmp_path / "cascade.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--max-tokens", "32", "--n", "4", "--strategy", "cascade",
                  "--option", "small=small", "--option", "large=large", "--replay", str(small), "--replay",
                  str(large), "--out", str(out)) == 0
    header, records = read_results(out)
    assert [other["model"] for other in header["replay"]["other_recordings"]] == ["large"]
    for r in records:
        assert r["prediction"] == "18" and r["details"]["escalated"]
        assert r["usage"]["models"]["small"]["generated_tokens"] == sum(
            b["generated_tokens"] for b in r["branches"][:4])
        assert r["usage"]["models"]["large"]["generated_tokens"] == 3  # "a b \boxed{18}"


def test_a_replayed_model_must_be_sampled_as_it_was_recorded(tmp_path, recording, monkeypatch):
    # the large model's recording sampled at temperature 0.7: a cascade escalating greedily cannot be answered by it
    large = tmp_path / "large-sc.jsonl"
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(["\\boxed{18}"], name="large"))
    assert ponder("bench", "--data", FIXTURE, "--n", "1", "--max-tokens", "32", "--out", str(large)) == 0
    with pytest.raises(PonderError, match="otherwise than .* recorded: temperature 0.0"):
        replay(tmp_path, recording, "--n", "4", "--strategy", "cascade", "--option", "small=fake",
               "--option", "large=large", "--replay", str(large))


@pytest.mark.parametrize("extra", [("--option", "early_exit=probe:every=2"),
                                   ("--strategy", "glimprouter", "--option", "small=fake", "--option", "large=fake")])
def test_strategies_that_fork_partial_solutions_must_run_live(tmp_path, recording, extra):
    with pytest.raises(PonderError, match="must run live"):
        replay(tmp_path, recording, "--n", "4", *extra)


PROGRAMS = ["```python\nprint(3 + 4)\n```", "```python\nprint(20 - 2)\n```", "```python\nprint(7)\n```"]


@pytest.fixture
def programs(tmp_path, monkeypatch) -> Path:
    """A pal run with n=6 over the fixture's problems: the programs print 7, 18, 7, 7, 18, 7."""
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(PROGRAMS))
    path = tmp_path / "pal6.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--strategy", "pal", "--n", "6", "--max-tokens", "32",
                  "--out", str(path)) == 0
    return path


def test_a_recorded_pal_run_replays_its_programs(tmp_path, programs):
    _, recorded = read_results(programs)
    _, replayed = replay(tmp_path, programs, "--strategy", "pal", "--n", "6")
    for was, now in zip(recorded, replayed, strict=True):
        assert now["prediction"] == was["prediction"] == "7" and now["votes"] == was["votes"]
        assert [b["text"] for b in now["branches"]] == [b["text"] for b in was["branches"]]
        assert now["usage"]["generated_tokens"] == was["usage"]["generated_tokens"]


def test_mix_replays_the_reasoning_of_an_sc_run_and_the_programs_of_a_pal_run(tmp_path, recording, programs):
    """Two recordings of one model on two prompts: mix's reasoning branches are sc's branches 0-2 (answers 7, 7, 18),
    its program branches pal's branches 0-2 (programs printing 7, 18, 7)."""
    _, reasoned = read_results(recording)
    _, coded = read_results(programs)
    header, records = replay(tmp_path, recording, "--strategy", "mix", "--n", "6", "--replay", str(programs))
    assert [other["strategy"] for other in header["replay"]["other_recordings"]] == ["pal"]
    for r, sc_run, pal_run in zip(records, reasoned, coded, strict=True):
        kinds = [b["details"]["kind"] for b in r["branches"]]
        assert kinds == ["program"] * 3 + ["cot"] * 3
        assert [b["text"] for b in r["branches"]] == ([b["text"] for b in pal_run["branches"][:3]]
                                                      + [b["text"] for b in sc_run["branches"][:3]])
        assert r["votes"] == {"7": 4, "18": 2} and r["prediction"] == "7"
        assert r["details"]["kinds"]["program"]["votes"] == {"7": 2, "18": 1}
        assert r["usage"]["generated_tokens"] == sum(b["generated_tokens"] for b in r["branches"])


def test_two_recordings_of_one_model_and_prompt_are_refused(tmp_path, recording):
    with pytest.raises(PonderError, match="both recorded fake on the same prompts"):
        replay(tmp_path, recording, "--n", "4", "--replay", str(recording))


def test_a_recording_with_a_system_prompt_replays_with_it_and_only_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: FakeEngine(SCRIPTS))
    recorded = tmp_path / "sc6-terse.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--n", "6", "--max-tokens", "32", "--system", "You are terse.",
                  "--out", str(recorded)) == 0
    _, records = replay(tmp_path, recorded, "--n", "6", "--system", "You are terse.")
    assert [r["prediction"] for r in records] == [r["prediction"] for r in read_results(recorded)[1]]
    with pytest.raises(PonderError, match="recorded no such prompt .* --system"):
        replay(tmp_path, recorded, "--n", "6", name="default-prompt.jsonl")
