"""ponder report: the table, the data behind the Pareto plot, the PNG and the Markdown report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from rich.console import Console

from ponder.bench.datasets import load_dataset
from ponder.bench.report import load_runs, pareto_series, plot_pareto, prompt_tag, write_report
from ponder.bench.runner import BenchConfig, read_results, run_bench
from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.prompts import MathPrompt

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bench_problems.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(out: Path, config: BenchConfig, scripts: list[str], data: str = str(FIXTURE)) -> Path:
    dataset = load_dataset(data)
    run_bench(FakeEngine(scripts), dataset, dataset.problems, config, out, progress=False)
    return out


@pytest.fixture
def results(tmp_path) -> dict[str, Path]:
    # Forks cycle through the scripts, so the answers differ from problem to problem: the curves are not flat.
    answers = ["\\boxed{7} " + "step " * 10, "\\boxed{18}", "\\boxed{-3} " + "step " * 4, "no idea", "\\boxed{1000}"]
    return {
        "greedy": bench(tmp_path / "greedy.jsonl", BenchConfig("greedy", 1, SamplingParams(temperature=0.0)),
                        ["\\boxed{7} " + "step " * 5]),
        "sc4": bench(tmp_path / "sc4.jsonl", BenchConfig("sc", 4, SamplingParams()), answers),
        "sc6": bench(tmp_path / "sc6.jsonl", BenchConfig("sc", 6, SamplingParams(temperature=1.0)), answers),
    }


def brute_maj(record: dict, k: int) -> float:
    """maj@k of one problem by enumerating every k-subset of its branches."""
    branches = record["branches"]
    total = 0.0
    subsets = list(itertools.combinations(branches, k))
    for subset in subsets:
        counts: dict[int, int] = {}
        for b in subset:
            if b["answer_class"] is not None:
                counts[b["answer_class"]] = counts.get(b["answer_class"], 0) + 1
        if counts:
            winners = [c for c, v in counts.items() if v == max(counts.values())]
            total += sum(record["answer_classes"][c]["correct"] for c in winners) / len(winners)
    return total / len(subsets)


def test_series_hold_the_greedy_point_and_the_maj_at_k_curves(results):
    runs, warnings = load_runs([results["greedy"], results["sc4"], results["sc6"]])
    assert warnings == []
    series = {s.label: s for s in pareto_series(runs)}
    assert set(series) == {"greedy", "sc n=4 temperature=0.7 maj@k", "sc n=6 temperature=1.0 maj@k"}

    greedy = series["greedy"]
    _, greedy_records = read_results(results["greedy"])
    assert greedy.kind == "point" and greedy.ks == []
    assert greedy.accuracy == [sum(r["correct"] for r in greedy_records) / 6] == [1 / 6]  # only "7" is right
    prompt = sum(r["usage"]["prompt_tokens"] for r in greedy_records) / 6
    assert prompt > 0
    assert greedy.tokens == [prompt + 6.0]  # the prompt, "\boxed{7}" and five words
    assert greedy.ci95[0] < greedy.accuracy[0] < greedy.ci95[1]

    for n, label in ((4, "sc n=4 temperature=0.7 maj@k"), (6, "sc n=6 temperature=1.0 maj@k")):
        curve = series[label]
        _, records = read_results(results[f"sc{n}"])
        tokens = sum(r["usage"]["generated_tokens"] for r in records) / len(records)
        prompt = sum(r["usage"]["prompt_tokens"] for r in records) / len(records)  # read once, shared by the forks
        assert curve.kind == "curve" and curve.ks == list(range(1, n + 1))
        assert curve.accuracy == pytest.approx([sum(brute_maj(r, k) for r in records) / len(records)
                                                for k in range(1, n + 1)])
        assert curve.tokens == pytest.approx([prompt + tokens * k / n for k in range(1, n + 1)])
        run = next(r for r in runs if r.label + " maj@k" == label)
        assert curve.wall_s == pytest.approx([run.metrics.wall_s * k / n for k in range(1, n + 1)])
    assert len(set(series["sc n=6 temperature=1.0 maj@k"].accuracy)) > 1  # the curve is not flat


def test_the_png_draws_exactly_the_series(results, tmp_path):
    runs, _ = load_runs(list(results.values()))
    png = tmp_path / "out" / "pareto.png"
    png.parent.mkdir()
    figure = plot_pareto(runs, png)
    assert png.read_bytes().startswith(PNG_MAGIC)
    token_axes, wall_axes = figure.axes
    for axes, field in ((token_axes, "tokens"), (wall_axes, "wall_s")):
        drawn = {}
        for line in axes.get_lines():
            if not line.get_label().startswith("_"):  # the points' lines belong to their error-bar containers
                drawn[line.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
        for container in axes.containers:
            marker = container.lines[0]
            drawn[container.get_label()] = (list(marker.get_xdata()), list(marker.get_ydata()))
        expected = {s.label: (getattr(s, field), s.accuracy) for s in pareto_series(runs)}
        assert drawn.keys() == expected.keys()
        for label, (xs, ys) in expected.items():
            assert drawn[label][0] == pytest.approx(xs) and drawn[label][1] == pytest.approx(ys)
        assert "per problem" in axes.get_xlabel() and axes.get_title()
    assert token_axes.get_ylabel().startswith("accuracy")
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert sorted(legend) == sorted(s.label for s in pareto_series(runs))
    annotations = [child.get_text() for child in token_axes.texts]
    assert {"k=1", "k=2", "k=4", "k=6"} <= set(annotations)  # powers of two and N


def test_write_report_prints_the_table_and_writes_png_and_markdown(results, tmp_path):
    console = Console(record=True, width=200)
    png = tmp_path / "plots" / "pareto.png"
    runs = write_report(list(results.values()), png, console)
    text = console.export_text()
    assert "greedy" in text and "sc n=4 temperature=0.7" in text and "sc n=6 temperature=1.0" in text
    assert "maj@k" in text and "pass@k" in text and "accuracy (95 % CI)" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("│ greedy"))
    assert "16.7% [3.0%, 56.4%]" in row  # 1 of 6, Wilson interval
    assert png.read_bytes().startswith(PNG_MAGIC)
    markdown = (tmp_path / "plots" / "pareto.md").read_text()
    assert "![Pareto plot](pareto.png)" in markdown
    assert "| greedy | greedy | 6 | 1 | 16.7% [3.0%, 56.4%] |" in markdown
    assert markdown.count("maj@k and pass@k from the same") == 2
    assert "Wilson" in markdown and "Chen et al." in markdown
    assert len(runs) == 3


def test_report_without_plot_writes_nothing(results, tmp_path):
    write_report([results["sc4"]], None, Console(record=True, width=200))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greedy.jsonl", "sc4.jsonl", "sc6.jsonl"]


def test_report_reads_a_file_a_crash_cut_short(results):
    path = results["sc4"]
    with open(path, "a") as f:
        f.write('{"id": "half", "gold": ')
    before = path.read_bytes()
    runs, _ = load_runs([path])
    assert runs[0].metrics.problems == 6
    assert path.read_bytes() == before  # reporting never modifies a results file


def test_runs_of_the_same_config_are_told_apart_by_file(results, tmp_path):
    copy = tmp_path / "sc4-again.jsonl"
    copy.write_bytes(results["sc4"].read_bytes())
    runs, _ = load_runs([results["sc4"], copy])
    assert [r.label for r in runs] == ["sc n=4 (sc4)", "sc n=4 (sc4-again)"]


def test_empty_runs_are_skipped_with_a_warning(results, tmp_path):
    header_only = tmp_path / "empty.jsonl"
    header_only.write_text(results["sc4"].read_text().splitlines()[0] + "\n")
    runs, warnings = load_runs([results["greedy"], header_only])
    assert [r.label for r in runs] == ["greedy"] and "empty.jsonl: no finished problems" in warnings[0]
    with pytest.raises(PonderError, match="no results to report"):
        load_runs([header_only])


def test_plot_refuses_runs_on_different_datasets(results, tmp_path):
    gym = bench(tmp_path / "gym.jsonl", BenchConfig("greedy", 1, SamplingParams()), ["\\boxed{3}"],
                data="gym:basic_arithmetic?seed=1&size=3")
    runs, _ = load_runs([results["greedy"], gym])
    with pytest.raises(PonderError, match="one dataset"):
        plot_pareto(runs, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "no results file"),
    ("data.jsonl", '{"id": "a", "question": "q", "answer": "1"}\n', "not a ponder results file"),
])
def test_bad_inputs_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(PonderError, match=message):
        load_runs([path])


def test_plot_path_must_be_a_png(results, tmp_path):
    with pytest.raises(PonderError, match="ending in .png"):
        write_report([results["sc4"]], tmp_path / "pareto.pdf", Console(record=True))


def test_problem_set_difference_is_noted(results, tmp_path):
    dataset = load_dataset(str(FIXTURE))
    partial = tmp_path / "partial.jsonl"
    run_bench(FakeEngine(["\\boxed{7}"]), dataset, dataset.problems[:2], BenchConfig("greedy", 1, SamplingParams()),
              partial, progress=False)
    console = Console(record=True, width=200)
    write_report([results["greedy"], partial], tmp_path / "p.png", console)
    assert "cover different problems" in console.export_text()
    assert "cover different problems" in (tmp_path / "p.md").read_text()
    assert json.loads(partial.read_text().splitlines()[0])["strategy"] == "greedy"


def test_common_problems_measures_every_run_on_the_shared_ones(results, tmp_path):
    header, records = read_results(results["sc4"])
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(line) + "\n" for line in [header, *records[:2]]))
    runs, _ = load_runs([results["sc6"], partial], common=True)
    assert [run.metrics.problems for run in runs] == [2, 2]
    assert {r["id"] for r in runs[0].records} == {r["id"] for r in records[:2]}
    assert [run.metrics.problems for run in load_runs([results["sc6"], partial])[0]] == [6, 2]

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(line) + "\n" for line in [header, *records[2:4]]))
    with pytest.raises(PonderError, match="no finished problem in common"):
        load_runs([partial, other], common=True)


def test_labels_show_the_options_a_run_set_and_defaults_for_the_rest(results, tmp_path):
    answers = ["\\boxed{7}", "\\boxed{18}"]
    logprob = bench(tmp_path / "w.jsonl", BenchConfig("sc", 4, SamplingParams(), options={"weighting": "logprob"}),
                    answers)
    runs, _ = load_runs([logprob])
    assert runs[0].label == "sc n=4 weighting=logprob"  # set, so shown even without a peer
    runs, _ = load_runs([logprob, results["sc4"]])
    assert [run.label for run in runs] == ["sc n=4 weighting=logprob", "sc n=4 weighting=majority"]


def test_a_sampling_field_an_older_file_predates_reads_as_its_default(results, tmp_path):
    header, records = read_results(results["sc4"])
    del header["config"]["params"]["hidden"]  # written before SamplingParams had the field
    older = tmp_path / "older.jsonl"
    older.write_text("".join(json.dumps(line) + "\n" for line in [header, *records]))
    runs, _ = load_runs([older, results["sc4"]])
    # the same configuration, so told apart by file name only (not by "hidden=None" against "hidden=False")
    assert [run.label for run in runs] == ["sc n=4 (older)", f"sc n=4 ({Path(results['sc4']).stem})"]


def test_runs_of_different_models_name_their_model_unless_the_strategy_uses_two(results, tmp_path):
    def as_model(path: Path, model: str, strategy: str | None = None) -> Path:
        header, records = read_results(path)
        header["model"]["name"] = model
        if strategy:  # a two-model strategy's defaults include its small and large models
            header["strategy"] = strategy
        out = tmp_path / f"{model}-{strategy or header['strategy']}.jsonl"
        out.write_text("".join(json.dumps(line) + "\n" for line in [header, *records]))
        return out

    large = as_model(results["greedy"], "qwen2.5-1.5b")
    small = as_model(results["sc4"], "qwen2.5-0.5b")
    two = as_model(results["greedy"], "qwen2.5-0.5b", strategy="specreason")
    runs, _ = load_runs([large, small, two])
    assert [run.label for run in runs] == ["greedy model=qwen2.5-1.5b", "sc n=4 model=qwen2.5-0.5b", "specreason"]
    runs, _ = load_runs([results["sc4"], results["sc6"]])  # one model: not named
    assert not any("model=" in run.label for run in runs)


def test_runs_asked_with_different_prompts_are_flagged(results, tmp_path):
    terse = MathPrompt("You are terse.")
    other = bench(tmp_path / "terse.jsonl", BenchConfig("sc", 4, SamplingParams(), prompt=terse),
                  ["\\boxed{7}", "\\boxed{18}"])
    console = Console(record=True, width=300)
    runs = write_report([results["sc4"], other, results["greedy"]], tmp_path / "p.png", console)
    tag = prompt_tag(terse)
    assert len(tag) == 6 and tag != "default"
    assert [run.label for run in runs] == ["sc n=4 prompt=default", f"sc n=4 prompt={tag}", "greedy prompt=default"]
    note = "asked with different prompts"
    for text in (console.export_text(), (tmp_path / "p.md").read_text()):
        assert note in text and f"{tag}: system message 'You are terse.', the default template" in text
        assert "default: no system message, the default template" in text


def test_runs_of_one_prompt_are_not_flagged_and_older_files_count_as_the_default(results, tmp_path):
    header, records = read_results(results["sc4"])
    del header["config"]["prompt"]  # as written before the header recorded the prompt
    older = tmp_path / "older.jsonl"
    older.write_text("".join(json.dumps(line) + "\n" for line in [header, *records]))
    console = Console(record=True, width=300)
    runs = write_report([older, results["sc6"]], None, console)
    assert [run.label for run in runs] == ["sc n=4 temperature=0.7", "sc n=6 temperature=1.0"]
    assert "prompt=" not in console.export_text() and "different prompts" not in console.export_text()


def with_usage(source: Path, out: Path, **usage) -> Path:
    """A copy of the results file ``source`` whose every record's usage is ``usage`` (plus its generated tokens)."""
    header, *records = source.read_text().splitlines()
    lines = [header]
    for line in records:
        record = json.loads(line)
        record["usage"] = {"generated_tokens": record["usage"]["generated_tokens"], **usage}
        lines.append(json.dumps(record))
    out.write_text("\n".join(lines) + "\n")
    return out


def table_row(path: Path) -> list[str]:
    out = Console(record=True, width=300)
    write_report([path], None, out)
    row = next(line for line in out.export_text().splitlines() if "greedy" in line and "%" in line)
    return [cell.strip() for cell in row.split("│")]


def test_probe_tokens_are_paid_on_the_token_axis_and_shown_in_the_table(results, tmp_path):
    """An early-exit run's probes are counted in no other field: the plot adds them to the generated tokens."""
    probed = with_usage(results["greedy"], tmp_path / "probed.jsonl", prompt_tokens=10, probe_tokens=4)
    runs, _ = load_runs([probed])
    (point,) = pareto_series(runs)
    assert point.tokens == [10.0 + 6.0 + 4.0]  # the prompt, six generated tokens per problem (see above), the probes
    assert runs[0].metrics.probe_tokens == 4.0
    assert table_row(probed)[9:11] == ["4", "20"]  # the probe tok and computed tok columns


def test_a_judges_reading_and_scoring_are_paid_and_cached_or_shared_prompt_tokens_are_not(results, tmp_path):
    """A search's judge reads the steps (prompt tokens of a second model) and feeds its verdicts (scored tokens): the
    token axis counts both. Prompt tokens a fork shared or the prefix cache held were not computed: not counted."""
    judged = with_usage(results["greedy"], tmp_path / "judged.jsonl", prompt_tokens=10 + 50, scored_tokens=8,
                        prompt_tokens_cached=20, prompt_tokens_shared=300,
                        models={"small": {"prompt_tokens": 10}, "large": {"prompt_tokens": 50, "scored_tokens": 8}})
    runs, _ = load_runs([judged])
    (point,) = pareto_series(runs)
    assert point.tokens == [60.0 - 20.0 + 6.0 + 8.0]
    assert table_row(judged)[6:11] == ["60", "6", "8", "0", "54"]  # prompt, gen, scored, probe, computed tok
