"""The benchmark runner on the fake engine: records, resume after crashes, refusing another run's file, concurrency."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.analysis import traces
from ponder.bench.datasets import load_dataset
from ponder.bench.runner import BenchConfig, ResultsFile, make_header, problem_seed, read_results, run_bench
from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, Script
from ponder.prompts import DEFAULT_TEMPLATE, MathPrompt
from ponder.strategies import STRATEGIES, Strategy

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "bench_problems.jsonl"
SC4 = BenchConfig("sc", 4, SamplingParams(max_tokens=64, logprobs=True), seed=1)


def scripted_engine() -> FakeEngine:
    # Forks take these in turn: with n=4 every problem gets "7", "7", "1/2" and no answer.
    return FakeEngine([Script("so \\boxed{7}", logprobs=[-0.5, -0.1]), "maybe \\boxed{7}", "\\boxed{1/2}", "hmm"])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_every_field(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems, SC4, out, progress=False)
    header, *records = lines(out)
    assert header["strategy"] == "sc" and header["config"]["n"] == 4 and header["config"]["seed"] == 1
    assert header["config"]["params"]["max_tokens"] == 64
    assert header["model"] == {"name": "fake", "sha256": "0" * 64, "path": ""}
    assert header["dataset"]["sha256"] == dataset.sha256 and header["dataset"]["problems"] == 6
    assert header["scoring"] == dataset.scoring and "ponder_version" in header
    assert [r["id"] for r in records] == [p.id for p in dataset.problems]
    by_id = {r["id"]: r for r in records}
    seven, half = by_id["seven"], by_id["half"]
    assert (seven["gold"], seven["prediction"], seven["correct"]) == ("7", "7", True)
    assert (half["prediction"], half["correct"]) == ("7", False)  # 1/2 was voted down 2 to 1
    assert half["level"] == "1" and half["subject"] == "Arithmetic" and "level" not in seven
    assert half["answer_classes"] == [{"answer": "7", "size": 2, "correct": False},
                                      {"answer": "1/2", "size": 1, "correct": True}]
    assert [b["answer_class"] for b in half["branches"]] == [0, 0, 1, None]
    assert [b["correct"] for b in half["branches"]] == [False, False, True, False]
    first = half["branches"][0]
    assert (first["answer"], first["generated_tokens"], first["finish_reason"]) == ("7", 2, "stop")
    assert first["mean_logprob"] == pytest.approx(-0.3) and first["text"] == "so \\boxed{7}"
    assert half["usage"]["generated_tokens"] == 2 + 2 + 1 + 1 and half["usage"]["prompt_tokens"] > 0
    assert half["votes"] == {"7": 2, "1/2": 1}
    assert half["finished"] >= half["started"] and half["wall_s"] >= 0 and half["session"]


def crash_mid_write(path: Path, record: dict) -> None:
    """What kill -9 can leave behind: the first part of a line, no newline."""
    text = json.dumps(record)
    with open(path, "a") as f:
        f.write(text[: len(text) // 2])


def test_resume_after_a_crash_mid_write(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems[:3], SC4, out, progress=False)
    finished_before = lines(out)
    crash_mid_write(out, finished_before[-1] | {"id": dataset.problems[3].id})

    with pytest.raises(json.JSONDecodeError):
        lines(out)  # the file as the crash left it
    engine = scripted_engine()
    results = run_bench(engine, dataset, dataset.problems, SC4, out, progress=False)
    after = lines(out)
    assert after[: len(finished_before)] == finished_before  # nothing written before the crash changed
    assert [r["id"] for r in after[1:]] == [p.id for p in dataset.problems]  # the cut-off problem ran again
    assert engine.stats().prefills == 3  # and only the three unfinished problems ran
    assert results.resumed == 3


def test_rerunning_a_finished_run_solves_nothing(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems, SC4, out, progress=False)
    before = out.read_bytes()
    engine = scripted_engine()
    run_bench(engine, dataset, dataset.problems, SC4, out, progress=False)
    assert engine.stats().prefills == 0 and out.read_bytes() == before


def test_a_header_cut_off_by_a_crash_is_rewritten(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    header = make_header(scripted_engine(), dataset, SC4)
    out.write_text(json.dumps(header)[:30])
    run_bench(scripted_engine(), dataset, dataset.problems[:2], SC4, out, progress=False)
    assert lines(out)[0]["config"] == header["config"] and len(lines(out)) == 3


KILLED_RUN = textwrap.dedent("""
    import asyncio, sys
    from ponder.bench.datasets import load_dataset
    from ponder.bench.runner import BenchConfig, run_bench
    from ponder.engine.base import SamplingParams
    from ponder.engine.fake import FakeEngine

    class SlowEngine(FakeEngine):  # a few milliseconds per token, so the kill lands while problems are in flight
        async def extend(self, branch, params, stop_if=None):
            await asyncio.sleep(0.003 * len(branch.script.tokens()))
            return await super().extend(branch, params, stop_if)

    dataset = load_dataset("gym:basic_arithmetic?seed=5&size=400")
    engine = SlowEngine(["the sum is \\\\boxed{3}", "it is \\\\boxed{4} " + "word " * 30])
    run_bench(engine, dataset, dataset.problems, BenchConfig("sc", 3, SamplingParams(max_tokens=64)), sys.argv[1],
              concurrency=4, progress=False)
""")


def test_resume_after_kill_9(tmp_path):
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    process = subprocess.Popen([sys.executable, str(script), str(out)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 180  # importing reasoning-gym is slow on a loaded machine
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = out.read_bytes()
    complete = killed[: killed.rfind(b"\n") + 1]
    records = [json.loads(line) for line in complete.splitlines()[1:]]  # every complete line is intact
    assert 5 <= len(records) < 400

    # Resume the rest in this process (quick engine, same config): the file ends with each problem exactly once.
    dataset = load_dataset("gym:basic_arithmetic?seed=5&size=400")
    config = BenchConfig("sc", 3, SamplingParams(max_tokens=64))
    engine = FakeEngine(["the sum is \\boxed{3}", "it is \\boxed{4} " + "word " * 30])
    run_bench(engine, dataset, dataset.problems, config, out, concurrency=8, progress=False)
    header, final = read_results(out)
    assert out.read_bytes().startswith(complete)  # what was complete at the kill is kept byte for byte
    assert sorted(r["id"] for r in final) == sorted(p.id for p in dataset.problems)
    assert engine.stats().prefills == 400 - len(records)


@pytest.mark.parametrize("change, field", [
    (lambda c, e, d: (replace(c, params=replace(c.params, temperature=1.0)), e, d), "config.params.temperature"),
    (lambda c, e, d: (replace(c, n=8), e, d), "config.n"),
    (lambda c, e, d: (replace(c, strategy="greedy"), e, d), "strategy"),
    (lambda c, e, d: (replace(c, options={"x": 1}), e, d), "config.options.x"),
    (lambda c, e, d: (replace(c, prompt=MathPrompt("You are terse.")), e, d), "config.prompt.system"),
    (lambda c, e, d: (replace(c, prompt=MathPrompt(template="Q: {question}")), e, d), "config.prompt.template"),
    (lambda c, e, d: (c, FakeEngine(["\\boxed{1}"], name="other") , d), None),  # same sha256: same model
    (lambda c, e, d: (c, e, load_dataset("gym:basic_arithmetic?seed=1&size=6")), "dataset sha256"),
])
def test_a_different_run_is_refused(tmp_path, change, field):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems[:2], SC4, out, progress=False)
    before = out.read_bytes()
    config, engine, dataset2 = change(SC4, scripted_engine(), dataset)
    header = make_header(engine, dataset2, config)
    if field is None:
        ResultsFile(out, header).close()  # accepted
        return
    with pytest.raises(PonderError, match=rf"{out} holds results of a different run \(.*{field} is"):
        ResultsFile(out, header)
    assert out.read_bytes() == before


def test_the_header_records_the_prompt(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    for prompt in (MathPrompt(), MathPrompt("You are terse.", "Q: {question}")):
        out = tmp_path / f"{prompt.system}.jsonl"
        run_bench(scripted_engine(), dataset, dataset.problems[:1], replace(SC4, prompt=prompt), out, progress=False)
        assert read_results(out)[0]["config"]["prompt"] == {"system": prompt.system, "template": prompt.template}
    assert read_results(tmp_path / "None.jsonl")[0]["config"]["prompt"]["template"] == DEFAULT_TEMPLATE


def test_a_file_written_before_prompts_were_recorded_resumes_as_the_default_prompt(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems[:2], SC4, out, progress=False)
    header, *records = lines(out)
    del header["config"]["prompt"]
    out.write_text("".join(json.dumps(line) + "\n" for line in [header, *records]))
    resumed = run_bench(scripted_engine(), dataset, dataset.problems, SC4, out, progress=False)
    assert resumed.resumed == 2 and len(resumed.records) == 6
    with pytest.raises(PonderError, match="config.prompt.system is None in the file, 'You are terse.' now"):
        run_bench(scripted_engine(), dataset, dataset.problems, replace(SC4, prompt=MathPrompt("You are terse.")),
                  out, progress=False)


def test_another_model_is_refused(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "r.jsonl"
    run_bench(scripted_engine(), dataset, dataset.problems[:1], SC4, out, progress=False)
    engine = scripted_engine()
    engine.model.sha256 = "1" * 64
    with pytest.raises(PonderError, match="model is '0000.*' in the file, '1111.*' now"):
        run_bench(engine, dataset, dataset.problems, SC4, out, progress=False)
    assert engine.stats().prefills == 0


@pytest.mark.parametrize("content", [b'{"id": "a", "question": "q", "answer": "1"}\n', b"some notes", b"\xff\xfe\n"])
def test_a_file_that_is_not_a_results_file_is_left_alone(tmp_path, content):
    dataset = load_dataset(str(FIXTURE))
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    with pytest.raises(PonderError, match="not .*ponder results file"):
        run_bench(scripted_engine(), dataset, dataset.problems, SC4, out, progress=False)
    assert out.read_bytes() == content


def test_concurrent_problems_share_the_batch(tmp_path):
    class CountingEngine(FakeEngine):
        most_live = 0

        async def extend(self, branch, params, stop_if=None):
            decoding = sum(1 for b in self._live if b.script is not None)  # forks, not the prompts they share
            CountingEngine.most_live = max(CountingEngine.most_live, decoding)
            return await super().extend(branch, params, stop_if)

    dataset = load_dataset(str(FIXTURE))
    for concurrency, expected in ((1, 2), (3, 6)):
        CountingEngine.most_live = 0
        engine = CountingEngine(["\\boxed{7} " + "step " * 20])
        config = BenchConfig("sc", 2, SamplingParams())
        run_bench(engine, dataset, dataset.problems, config, tmp_path / f"c{concurrency}.jsonl",
                  concurrency=concurrency, progress=False)
        assert CountingEngine.most_live == expected


def test_strategy_gets_the_config_and_a_per_problem_seed(tmp_path, monkeypatch):
    calls = []
    sc = STRATEGIES["sc"]

    async def recording(engine, question, *, n, params, seed, prompt, depth=1):
        calls.append((question, n, params.temperature, seed, depth))
        prompts.append(prompt)
        return await sc(engine, question, n=n, params=params, seed=seed)

    prompts = []
    monkeypatch.setitem(STRATEGIES, "recording", Strategy("recording", recording, "records its calls", "vote"))
    dataset = load_dataset(str(FIXTURE))
    config = BenchConfig("recording", 2, SamplingParams(temperature=0.3), seed=9, options={"depth": 4},
                         prompt=MathPrompt("You are terse."))
    run_bench(scripted_engine(), dataset, dataset.problems, config, tmp_path / "a.jsonl", concurrency=2,
              progress=False)
    assert sorted(calls) == sorted((p.question, 2, 0.3, problem_seed(9, p.id), 4) for p in dataset.problems)
    assert prompts == [config.prompt] * len(dataset.problems)
    # the seed depends on the run seed and the problem alone, not on its position in the run
    shuffled = dataset.select(shuffle=True, seed=1)
    calls.clear()
    run_bench(scripted_engine(), dataset, shuffled, config, tmp_path / "b.jsonl", progress=False)
    assert sorted(calls) == sorted((p.question, 2, 0.3, problem_seed(9, p.id), 4) for p in dataset.problems)
    assert problem_seed(9, "a") != problem_seed(10, "a") and problem_seed(9, "a") != problem_seed(9, "b")


def test_unknown_strategy_option_is_refused_before_running(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    engine = scripted_engine()
    with pytest.raises(PonderError, match="strategy 'sc' does not take option 'depth'"):
        run_bench(engine, dataset, dataset.problems, replace(SC4, options={"depth": 2}), tmp_path / "r.jsonl",
                  progress=False)
    assert engine.stats().prefills == 0 and not (tmp_path / "r.jsonl").exists()


def test_a_prompt_too_long_is_recorded_as_wrong(tmp_path):
    dataset = load_dataset(str(FIXTURE))
    engine = FakeEngine(["\\boxed{7}"], kv_cells=20)  # "Apples cost $3 each..." has more words than that
    run_bench(engine, dataset, dataset.problems, SC4, tmp_path / "r.jsonl", progress=False)
    _, records = read_results(tmp_path / "r.jsonl")
    dollars = next(r for r in records if r["id"] == "dollars")
    assert dollars["correct"] is False and dollars["prediction"] is None and "prompt has" in dollars["error"]
    assert next(r for r in records if r["id"] == "seven")["correct"] is True


def test_an_engine_failure_stops_the_run_with_its_own_error(tmp_path):
    class BrokenEngine(FakeEngine):
        async def extend(self, branch, params, stop_if=None):
            await asyncio.sleep(0)
            raise PonderError("the engine lost its context")

    dataset = load_dataset(str(FIXTURE))
    with pytest.raises(PonderError, match="lost its context"):
        run_bench(BrokenEngine(["x"]), dataset, dataset.problems, SC4, tmp_path / "r.jsonl", concurrency=3,
                  progress=False)
    assert not (tmp_path / "r.jsonl").exists()  # the run made it and put no result in it: nothing to resume

    run_bench(scripted_engine(), dataset, dataset.problems[:2], SC4, tmp_path / "r.jsonl", progress=False)
    with pytest.raises(PonderError, match="lost its context"):
        run_bench(BrokenEngine(["x"]), dataset, dataset.problems, SC4, tmp_path / "r.jsonl", progress=False)
    assert len(read_results(tmp_path / "r.jsonl")[1]) == 2  # a file with results is never removed


@pytest.mark.parametrize("kwargs, message", [({"concurrency": 0}, "--concurrency"), ({"n": 0}, "--n")])
def test_bad_run_settings_are_refused(tmp_path, kwargs, message):
    dataset = load_dataset(str(FIXTURE))
    config = replace(SC4, n=kwargs.get("n", 4))
    with pytest.raises(PonderError, match=message):
        run_bench(scripted_engine(), dataset, dataset.problems, config, tmp_path / "r.jsonl",
                  concurrency=kwargs.get("concurrency", 1), progress=False)


def test_progress_bar_shows_accuracy_and_speed_on_a_terminal(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import ponder.bench.runner as runner

    screen = io.StringIO()
    monkeypatch.setattr(runner, "Console", lambda **_: Console(file=screen, force_terminal=True, width=150))
    monkeypatch.setattr(runner._BenchProgress, "TICK_S", 0.001)
    dataset = load_dataset(str(FIXTURE))
    run_bench(scripted_engine(), dataset, dataset.problems, SC4, tmp_path / "r.jsonl", concurrency=2)
    shown = screen.getvalue()
    correct = sum(r["correct"] for r in read_results(tmp_path / "r.jsonl")[1])
    assert "6/6" in shown and f"acc {correct / 6:.1%}" in shown and "ETA" in shown
    assert re.search(r"[1-9]\d* tok/s", shown)  # the engine's counters moved the speed off zero


@pytest.mark.model
def test_bench_on_the_real_engine(real_engine, tmp_path):
    dataset = load_dataset("gym:basic_arithmetic?seed=2&size=2")
    config = BenchConfig("sc", 2, SamplingParams(max_tokens=24, logprobs=True))
    results = run_bench(real_engine, dataset, dataset.problems, config, tmp_path / "r.jsonl", concurrency=2,
                        progress=False)
    assert results.header["model"]["sha256"] == real_engine.model.sha256
    assert len(results.records) == 2
    for record in results.records:
        assert len(record["branches"]) == 2
        for branch in record["branches"]:
            assert 0 < branch["generated_tokens"] <= 24 and branch["mean_logprob"] < 0
        assert record["usage"]["generated_tokens"] == sum(b["generated_tokens"] for b in record["branches"])
        assert record["usage"]["prompt_tokens"] > 0


def test_progress_is_one_line_per_problem_when_stderr_is_not_a_terminal(tmp_path, capsys):
    dataset = load_dataset(str(FIXTURE))
    run_bench(scripted_engine(), dataset, dataset.problems[:2], SC4, tmp_path / "r.jsonl")
    run_bench(scripted_engine(), dataset, dataset.problems[:3], SC4, tmp_path / "r.jsonl")  # resumed: 2 done
    captured = capsys.readouterr()
    logged = captured.err.splitlines()
    assert captured.out == "" and len(logged) == 3
    assert re.match(r"bench 1/2  \S+ (right|wrong)  acc \d+\.\d%  \d+ tok/s  elapsed 0:00:\d\d  ETA 0:00:\d\d$",
                    logged[0])
    assert logged[2].startswith("bench 3/3 ") and logged[2].endswith("ETA 0:00:00")


def test_the_trace_analysis_reads_a_results_file(tmp_path):
    assert traces.auroc([3, 2, 1, 1], [True, True, False, True]) == (1 + 1 + 0.5) / 3
    assert traces.auroc([1, 2], [True, True]) is None  # no wrong branch: nothing to separate

    def branch(answer_class, logprob):
        return {"answer_class": answer_class, "mean_logprob": logprob}

    record = {"prediction": "7", "answer_classes": [{"answer": "7", "correct": False}, {"answer": "8", "correct": True}],
              "branches": [branch(0, -0.5), branch(0, -3.0), branch(1, -0.05), branch(None, None)]}
    assert not traces.revote(record)  # 7 has two votes
    assert traces.revote(record, lambda b: math.exp(b["mean_logprob"]))  # e^-0.05 > e^-0.5 + e^-3
    assert not traces.revote(record, keep=0.5)  # -0.05 (8) and -0.5 (7): the tie goes to the run's answer
    assert traces.revote(record, keep=0.1)  # the single most confident branch says 8

    assert traces.leader_share({"answer_classes": [{"size": 3}, {"size": 1}], "branches": [{}] * 5}) == 0.6
    assert traces.accuracy_by_length_rank([{"branches": [{"generated_tokens": 9, "correct": True},
                                                         {"generated_tokens": 2, "correct": False}]}]) == [(0.0, 2.0),
                                                                                                          (1.0, 9.0)]

    dataset = load_dataset(str(FIXTURE))
    run_bench(scripted_engine(), dataset, dataset.problems, SC4, tmp_path / "r.jsonl", progress=False)
    out = subprocess.run([sys.executable, "-m", "benchmarks.analysis.traces", str(tmp_path / "r.jsonl")], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "6 problems, 18 branches with an answer" in out and re.search(r"majority\s+16\.7%  \(1/6\)", out)
    assert "agree:" in out and re.search(r"\n\s+1\s+\d+\.\d%\s+\d+\n", out)
