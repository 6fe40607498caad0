"""The `ponder bench` and `ponder report` subcommands, registered on a parser the way ponder's CLI does it."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

import ponder.bench.cli as bench_cli
import ponder.options as options
from ponder.bench.runner import read_results
from ponder.engine.base import PonderError
from ponder.engine.fake import FakeEngine

FIXTURE = str(Path(__file__).parents[1] / "fixtures" / "bench_problems.jsonl")


class ClosingEngine(FakeEngine):
    closed = 0

    def close(self) -> None:
        ClosingEngine.closed += 1


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """Replace the model with the fake engine; return the load_engine calls."""
    calls = []

    def load_engine(model=None, *, engine="llamacpp", base_url=None):
        calls.append({"model": model, "engine": engine, "base_url": base_url})
        return ClosingEngine(["\\boxed{7} " + "step " * 3, "\\boxed{18}", "nothing"])

    monkeypatch.setattr(options, "load_engine", load_engine)
    ClosingEngine.closed = 0
    return calls


def ponder(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ponder")
    bench_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_runs_and_resumes(tmp_path, loads, capsys):
    out = tmp_path / "results" / "sc3.jsonl"
    command = ["bench", "--data", FIXTURE, "--n", "3", "--limit", "4", "--out", str(out), "--concurrency", "2",
               "--max-tokens", "32", "--seed", "5"]
    assert ponder(*command) == 0
    first = capsys.readouterr().out
    assert f"{out}: 4 problems (0 resumed), accuracy" in first and "maj@1" in first and "pass@3" in first
    header, records = read_results(out)
    assert header["config"]["n"] == 3 and header["config"]["seed"] == 5
    assert header["config"]["params"]["max_tokens"] == 32 and header["config"]["params"]["logprobs"] is True
    assert [r["id"] for r in records] != [] and len(records) == 4
    assert records[0]["branches"][0]["mean_logprob"] is not None
    assert loads == [{"model": None, "engine": "llamacpp", "base_url": None}] and ClosingEngine.closed == 1

    command[command.index("4")] = "6"  # the same run, extended to every problem
    assert ponder(*command) == 0
    assert f"{out}: 6 problems (4 resumed)" in capsys.readouterr().out
    assert len(read_results(out)[1]) == 6


def test_bench_refuses_another_config_into_the_same_file(tmp_path, loads):
    out = tmp_path / "r.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--n", "2", "--limit", "2", "--out", str(out)) == 0
    with pytest.raises(PonderError, match="holds results of a different run.*config.params.temperature is 0.7 in "
                                          "the file, 0.2 now"):
        ponder("bench", "--data", FIXTURE, "--n", "2", "--limit", "2", "--temperature", "0.2", "--out", str(out))
    assert ClosingEngine.closed == 2  # the engine is closed on errors too


def test_bench_passes_strategy_options_and_model_flags(tmp_path, loads):
    out = tmp_path / "r.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--limit", "1", "--n", "2", "--option", "weighting=majority",
                  "--model", "qwen2.5-0.5b", "--out", str(out)) == 0
    assert read_results(out)[0]["config"]["options"] == {"weighting": "majority"}
    assert loads[0]["model"] == "qwen2.5-0.5b"


def test_bench_records_the_prompt_arguments(tmp_path, loads):
    out, template = tmp_path / "r.jsonl", tmp_path / "template.txt"
    template.write_text("Q: {question}\n")
    assert ponder("bench", "--data", FIXTURE, "--limit", "1", "--n", "2", "--system", "You are terse.",
                  "--prompt-template", str(template), "--out", str(out)) == 0
    assert read_results(out)[0]["config"]["prompt"] == {"system": "You are terse.", "template": "Q: {question}"}
    with pytest.raises(PonderError, match="config.prompt.system is 'You are terse.' in the file, None now"):
        ponder("bench", "--data", FIXTURE, "--limit", "1", "--n", "2", "--prompt-template", str(template),
               "--out", str(out))


@pytest.mark.parametrize("extra, recorded", [
    ([], True),  # the in-process engine computes logprobs anyway
    (["--no-record-logprobs"], False),
    (["--engine", "openai", "--base-url", "http://127.0.0.1:1/v1"], False),  # a server may pay dearly for them
    (["--engine", "openai", "--base-url", "http://127.0.0.1:1/v1", "--record-logprobs"], True),
])
def test_logprobs_are_recorded_where_free_or_asked_for(tmp_path, loads, extra, recorded):
    out = tmp_path / "r.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--limit", "2", "--n", "2", "--out", str(out), *extra) == 0
    header, records = read_results(out)
    assert header["config"]["params"]["logprobs"] is recorded
    assert all((b["mean_logprob"] is not None) is recorded for r in records for b in r["branches"])


def test_a_strategy_that_needs_logprobs_gets_them_on_a_remote_engine(tmp_path, loads):
    out = tmp_path / "r.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--limit", "2", "--n", "2", "--option", "weighting=logprob",
                  "--engine", "openai", "--base-url", "http://127.0.0.1:1/v1", "--out", str(out)) == 0
    header, records = read_results(out)
    assert header["config"]["params"]["logprobs"] is False  # not recorded for their own sake...
    assert all(b["mean_logprob"] is not None for r in records for b in r["branches"])  # ...but the vote needs them


@pytest.mark.parametrize("extra, error, message", [
    (["--option", "no_such_option=3"], PonderError, "does not take option .no_such_option."),
    (["--option", "novalue"], ValueError, "KEY=VALUE"),
    (["--strategy", "nope"], PonderError, "unknown strategy 'nope'"),
    (["--temperature", "-1"], ValueError, "temperature"),
    (["--offset", "99"], PonderError, "past the end"),
    (["--prompt-template", "no-such-template.txt"], PonderError, "no-such-template.txt: no such file"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, loads, extra, error, message):
    with pytest.raises(error, match=message):
        ponder("bench", "--data", FIXTURE, "--out", str(tmp_path / "r.jsonl"), *extra)
    assert loads == [] and not (tmp_path / "r.jsonl").exists()


def test_missing_dataset_names_the_places_looked(tmp_path, loads, monkeypatch):
    monkeypatch.setenv("PONDER_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ponder.bench.datasets._REPO_ROOT", tmp_path / "repo")
    with pytest.raises(PonderError, match=r"dataset 'aime24' not found; looked for aime24.jsonl in: .*PONDER_DATA"):
        ponder("bench", "--data", "aime24", "--out", str(tmp_path / "r.jsonl"))


def test_bad_numbers_are_argparse_errors(tmp_path, loads, capsys):
    with pytest.raises(SystemExit) as exit_:
        ponder("bench", "--data", FIXTURE, "--limit", "0", "--out", str(tmp_path / "r.jsonl"))
    assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err


def test_an_interrupted_bench_keeps_what_finished(tmp_path, monkeypatch, capsys):
    class InterruptedEngine(ClosingEngine):
        opened = 0

        async def open(self, prompt, usage=None, *, model=None):
            InterruptedEngine.opened += 1
            if InterruptedEngine.opened == 3:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while the third problem starts
                await asyncio.sleep(1)
            return await super().open(prompt, usage, model=model)

    monkeypatch.setattr(options, "load_engine", lambda *a, **k: InterruptedEngine(["\\boxed{7}"]))
    # Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored (a background job, some CI runners)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "r.jsonl"
    try:
        code = ponder("bench", "--data", FIXTURE, "--strategy", "greedy", "--out", str(out))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert "rerun the same command to resume" in capsys.readouterr().out
    assert [r["id"] for r in read_results(out)[1]] == ["half", "thousand"]


def test_report_command_writes_plot_and_markdown(tmp_path, loads, capsys):
    greedy, sc = tmp_path / "greedy.jsonl", tmp_path / "sc.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--strategy", "greedy", "--out", str(greedy)) == 0
    assert ponder("bench", "--data", FIXTURE, "--n", "3", "--out", str(sc)) == 0
    capsys.readouterr()
    png = tmp_path / "report" / "pareto.png"
    assert ponder("report", str(greedy), str(sc), "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "sc n=3" in out and f"wrote {png}" in out
    assert png.stat().st_size > 0 and (tmp_path / "report" / "pareto.md").is_file()
    assert json.loads(greedy.read_text().splitlines()[0])["strategy"] == "greedy"


def test_report_without_matplotlib_names_the_plot_extra(tmp_path, loads, monkeypatch):
    out = tmp_path / "r.jsonl"
    assert ponder("bench", "--data", FIXTURE, "--strategy", "greedy", "--limit", "1", "--out", str(out)) == 0
    monkeypatch.delitem(sys.modules, "ponder.bench.report", raising=False)
    for name in [m for m in sys.modules if m.partition(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert ponder("report", str(out)) == 0  # the table needs no matplotlib
    with pytest.raises(PonderError, match=r'matplotlib, an optional extra: pip install "ponder\[plot\]"'):
        ponder("report", str(out), "--plot", str(tmp_path / "p.png"))


def test_report_command_refuses_a_missing_file(tmp_path):
    with pytest.raises(PonderError, match="no results file"):
        ponder("report", str(tmp_path / "none.jsonl"))
