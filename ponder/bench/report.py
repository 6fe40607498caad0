"""``ponder report``: compare results files as a table, a Pareto plot of accuracy against cost, and Markdown.

Each results file is one run (one strategy configuration). A run of independent samples (``sc`` with N >= 2) is
drawn as its maj@k curve, k = 1..N, computed from its own samples; any other run is one point with its 95 % Wilson
interval. The two panels put accuracy against the two costs per problem:

* tokens computed: every token a model computed for the problem, both models counted (the prompt tokens it evaluated,
  a judge's or a large model's reading included, and the tokens generated, scored, probed or drafted; see
  ``RunMetrics.computed_tokens``), so a search pays for its judge. For maj@k this is the prompt plus k/N of the run's
  tokens after it, which is exactly the expected count of a random k-subset of its samples;
* wall time: for maj@k this is k/N of the run's wall time, i.e. the time k samples take *at the throughput the N-sample
  run had* (an estimate: a run with fewer samples batches fewer branches and decodes fewer tokens per second).

Runs asked with different prompts (system message, user-turn template) are never compared silently: every label then
names its run's prompt (``prompt=default`` or a short hash of it), and a note lists what each prompt was.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..engine.base import PonderError
from ..prompts import DEFAULT_PROMPT, DEFAULT_TEMPLATE, MathPrompt
from .metrics import RunMetrics, summarize
from .runner import read_results, recorded_params, run_prompt

# Costs are per problem: prompt and generated tokens, wall time (elapsed / problems), latency (start to answer).
RUN_COLUMNS = ("run", "strategy", "problems", "branches", "accuracy (95 % CI)", "prompt tok", "gen tok", "scored tok",
               "probe tok", "computed tok", "wall s", "latency s", "gen tok/s")


@dataclass
class Run:
    path: Path
    header: dict
    records: list[dict]
    metrics: RunMetrics
    label: str = ""  # set by ``load_runs``, which sees what differs between the runs


@dataclass
class Series:
    """One thing drawn on both panels: a ``point`` (one configuration) or a ``curve`` (maj@k, k = ``ks``)."""

    label: str
    kind: str
    ks: list[int]  # k of each curve point; empty for a point
    accuracy: list[float]
    tokens: list[float]  # mean tokens computed per problem (``RunMetrics.computed_tokens``)
    wall_s: list[float]  # wall time per problem, seconds
    ci95: tuple[float, float] | None = None  # for points
    replay: bool = False  # a ``ponder bench --replay`` run: drawn hollow, its wall time is an estimate


def load_runs(paths: Sequence[str | Path], common: bool = False) -> tuple[list[Run], list[str]]:
    """The runs of ``paths`` with metrics and labels, and a warning for each file that has no finished problem.
    ``common``: measure every run only on the problems that all of them finished."""
    loaded, warnings = [], []
    for path in paths:
        header, records = read_results(path)
        if not records:
            warnings.append(f"{path}: no finished problems yet, left out")
            continue
        loaded.append((Path(path), header, records))
    if not loaded:
        raise PonderError("no results to report: " + "; ".join(warnings))
    if common:
        shared = set.intersection(*({r["id"] for r in records} for _, _, records in loaded))
        if not shared:
            raise PonderError("--common-problems: the runs have no finished problem in common")
        loaded = [(path, header, [r for r in records if r["id"] in shared]) for path, header, records in loaded]
    runs = [Run(path, header, records, summarize(header["strategy"], records)) for path, header, records in loaded]
    _label(runs)
    return runs, warnings


def _label(runs: list[Run]) -> None:
    """Name each run by its strategy, n, the settings that differ from other runs of the same strategy, the options
    it set, and its model and prompt when the runs were not all made with the same one."""
    settings = {id(run): _settings(run) for run in runs}
    prompts_differ = len({run_prompt(run.header) for run in runs}) > 1
    models_differ = len({run.header["model"]["name"] for run in runs}) > 1
    for run in runs:
        peers = [settings[id(other)] for other in runs if other.header["strategy"] == run.header["strategy"]]
        varying = sorted({key for s in peers for key in s if any(p.get(key) != s.get(key) for p in peers)})
        parts = [run.header["strategy"]]
        if run.metrics.branches > 1:  # greedy accepts n but always runs one branch: do not print an n it ignored
            parts.append(f"n={run.header['config']['n']}")
        # The settings that tell it from its peers, and the strategy options it was given (keep=10 makes DeepConf-low).
        shown = varying + sorted(set(run.header["config"]["options"]) - set(varying))
        parts += [f"{key}={settings[id(run)].get(key)}" for key in shown]
        # Runs of several models side by side: a one-model run says which (a two-model strategy's small and large
        # options name both; its header's model is only the first).
        if models_differ and "model" not in shown and "large" not in settings[id(run)]:
            parts.append(f"model={settings[id(run)]['model']}")
        if prompts_differ:
            parts.append(f"prompt={prompt_tag(run_prompt(run.header))}")
        if run.header.get("replay"):
            parts.append("(replay)")
        run.label = " ".join(parts)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:  # same configuration twice (e.g. a rerun): the file names tell them apart
            run.label += f" ({run.path.stem})"


def _settings(run: Run) -> dict:
    config = run.header["config"]
    return {"model": run.header["model"]["name"], "seed": config["seed"], **recorded_params(run.header),
            **_option_defaults(run.header["strategy"]), **config["options"]}


def _option_defaults(strategy: str) -> dict:
    """The strategy's options left at their defaults, so that a run that did not set one is labelled by its value."""
    from ..strategies import STRATEGIES  # only here: the strategies pull in scipy

    declared = STRATEGIES.get(strategy)
    if declared is None:  # a results file from a strategy this ponder no longer has
        return {}
    return {name: p.default for name, p in declared.options.items() if p.default is not inspect.Parameter.empty}


def prompt_tag(prompt: MathPrompt) -> str:
    """A short name for a prompt: ``default``, or the first hex digits of a hash of it."""
    if prompt == DEFAULT_PROMPT:
        return "default"
    return hashlib.sha256(json.dumps(prompt.to_dict(), sort_keys=True).encode()).hexdigest()[:6]


def describe_prompt(prompt: MathPrompt) -> str:
    system = "no system message" if prompt.system is None else f"system message {prompt.system!r}"
    template = "the default template" if prompt.template == DEFAULT_TEMPLATE else f"template {prompt.template!r}"
    return f"{system}, {template}"


def prompt_note(runs: Sequence[Run]) -> str | None:
    """What the runs' prompts were, unless every run used the default one."""
    prompts = {prompt_tag(prompt): prompt for prompt in (run_prompt(run.header) for run in runs)}
    if list(prompts) == ["default"]:
        return None
    described = "; ".join(f"{tag}: {describe_prompt(prompt)}" for tag, prompt in prompts.items())
    if len(prompts) == 1:
        return f"every run was asked with the same prompt, {described}"
    return (f"the runs were asked with different prompts, so their accuracies are not measured with the same "
            f"instructions (prompt= in the labels): {described}")


def has_own_curve(run: Run) -> bool:
    """Whether the run's samples give a maj@k curve of its own. A replay's samples are its recording's, so its curve
    would repeat the recording's: a replay is shown by its own vote."""
    return run.metrics.maj_at_k is not None and not run.header.get("replay")


def pareto_series(runs: Sequence[Run]) -> list[Series]:
    """The data behind the Pareto plot, one series per run."""
    series = []
    for run in runs:
        m = run.metrics
        if not has_own_curve(run):
            series.append(Series(run.label, "point", [], [m.accuracy], [m.computed_tokens], [m.wall_s], m.ci95,
                                 replay=bool(run.header.get("replay"))))
            continue
        ks = list(range(1, m.samples + 1))
        series.append(Series(f"{run.label} maj@k", "curve", ks, list(m.maj_at_k),
                             [curve_tokens(m, k) for k in ks],
                             [m.wall_s * k / m.samples for k in ks]))
    return series


def plot_pareto(runs: Sequence[Run], path: str | Path):
    """Write the two-panel PNG of ``pareto_series(runs)`` to ``path``; return the figure (its axes hold the data)."""
    from matplotlib.figure import Figure  # only plots need matplotlib (the `plot` extra)
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    datasets = sorted({run.header["dataset"]["name"] for run in runs})
    if len({run.header["dataset"]["sha256"] for run in runs}) > 1:
        raise PonderError(f"a Pareto plot compares runs on one dataset; these files cover different data "
                          f"({', '.join(datasets)})")
    series = pareto_series(runs)
    figure = Figure(figsize=(13, 5.5), layout="constrained")
    token_axes, wall_axes = figure.subplots(1, 2, sharey=True)
    for color, s in zip(_colors(len(series)), series):
        for axes, xs, estimate in ((token_axes, s.tokens, False), (wall_axes, s.wall_s, True)):
            if s.kind == "point":
                low, high = s.ci95
                axes.errorbar(xs, s.accuracy, yerr=[[s.accuracy[0] - low], [high - s.accuracy[0]]], fmt="s",
                              color=color, capsize=4, markersize=7, label=s.label,
                              markerfacecolor="white" if s.replay else color)
                continue
            axes.plot(xs, s.accuracy, marker="o", markersize=4, color=color, label=s.label,
                      linestyle="--" if estimate else "-")
            for k, x, y in zip(s.ks, xs, s.accuracy):
                if k & (k - 1) == 0 or k == s.ks[-1]:  # powers of two and N, so labels do not pile up
                    axes.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8,
                                  color=color)
    token_axes.set_title("accuracy vs tokens computed per problem (every model counted)")
    token_axes.set_xlabel("prompt evaluated + generated + scored + probe tokens per problem (mean, log scale)")
    wall_axes.set_title("accuracy vs wall time per problem")
    # Estimates (maj@k: k/N of the N-sample run; replays: at the recorded run's s/token) are explained in the .md.
    wall_axes.set_xlabel("wall time per problem (s, log scale; dashed and hollow: estimated)")
    token_axes.set_ylabel("accuracy (problems solved)")
    for axes in (token_axes, wall_axes):
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(FuncFormatter(_axis_number))
        axes.margins(x=0.1)  # room for the k= labels at the ends of the curves
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(True, which="both", alpha=0.3)
    # One legend for both panels, under them, so it never hides a point.
    figure.legend(*token_axes.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(series), 4),
                  fontsize=9)
    models = sorted({run.header["model"]["name"] for run in runs})
    problems = sorted({run.metrics.problems for run in runs})
    figure.suptitle(f"{' = '.join(datasets)} — {', '.join(models)} — {'/'.join(map(str, problems))} problems per run")
    figure.savefig(path, dpi=150)
    return figure


def _colors(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    palette = colormaps["tab20"]  # dark and light of ten hues: no two series share a color up to 20
    return [palette(i % 20) for i in range(count)]


def run_row(run: Run) -> list[str]:
    """One row of the comparison table (columns ``RUN_COLUMNS``), shared by the terminal and Markdown reports."""
    m = run.metrics
    low, high = m.ci95
    return [run.label, run.header["strategy"], str(m.problems), f"{m.branches:.3g}",
            f"{m.accuracy:.1%} [{low:.1%}, {high:.1%}]", f"{m.prompt_tokens:.0f}", f"{m.generated_tokens:.0f}",
            f"{m.scored_tokens:.0f}", f"{m.probe_tokens:.0f}", f"{m.computed_tokens:.0f}", f"{m.wall_s:.2f}",
            f"{m.latency_s:.2f}", f"{m.tokens_per_s:.1f}"]


def curve_rows(run: Run) -> list[list[str]]:
    """k, maj@k, pass@k and tokens per problem for k = 1..N of a sampling run."""
    m = run.metrics
    return [[str(k), f"{maj:.1%}", f"{passed:.1%}", f"{m.generated_tokens * k / m.samples:.0f}",
             f"{curve_tokens(m, k):.0f}"]
            for k, maj, passed in zip(range(1, m.samples + 1), m.maj_at_k, m.pass_at_k)]


def curve_tokens(m: RunMetrics, k: int) -> float:
    """Tokens computed by maj@k: the prompt, evaluated once whatever k, and k/N of the tokens after it."""
    return m.prompt_computed + m.after_prompt_tokens * k / m.samples


CURVE_COLUMNS = ("k", "maj@k", "pass@k", "gen tok", "computed tok")


def problem_set_note(runs: Sequence[Run]) -> str | None:
    ids = {frozenset(r["id"] for r in run.records) for run in runs}
    if len(ids) > 1:
        return "the runs cover different problems, so their accuracies are not measured on the same questions"
    return None


def print_report(runs: Sequence[Run], console: Console) -> None:
    table = Table(title="ponder bench results (costs per problem)", title_justify="left")
    for i, column in enumerate(RUN_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for run in runs:
        table.add_row(*run_row(run))
    console.print(table)
    for run in runs:
        if not has_own_curve(run):
            continue
        curve = Table(title=f"{run.label}: maj@k, pass@k ({run.metrics.samples} samples)", title_justify="left")
        for column in CURVE_COLUMNS:
            curve.add_column(column, justify="right")
        for row in curve_rows(run):
            curve.add_row(*row)
        console.print(curve)
    for note in (problem_set_note(runs), prompt_note(runs)):
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}")


def markdown_report(runs: Sequence[Run], png: Path) -> str:
    """A Markdown page for the runs, embedding ``png`` (given relative to where the page is written)."""
    datasets = sorted({run.header["dataset"]["name"] for run in runs})
    lines = [f"# ponder bench report: {', '.join(datasets)}", ""]
    for run in runs:
        h = run.header
        lines.append(f"- **{run.label}**: `{run.path}` — model {h['model']['name']} "
                     f"(sha256 `{h['model']['sha256']}`), dataset {h['dataset']['name']} (sha256 `{h['dataset']['sha256'][:16]}…`),"
                     f" ponder {h['ponder_version']}, scoring: {h['scoring']}"
                     + (f"; a replay of the branches recorded in `{h['replay']['source']}`" if h.get("replay") else ""))
    lines += ["", _markdown_table(RUN_COLUMNS, [run_row(run) for run in runs]), "", f"![Pareto plot]({png})", ""]
    for note in (problem_set_note(runs), prompt_note(runs)):
        if note:
            lines += [f"**Note:** {note}.", ""]
    for run in runs:
        if has_own_curve(run):
            lines += [f"## {run.label}: maj@k and pass@k from the same {run.metrics.samples} samples", "",
                      _markdown_table(CURVE_COLUMNS, curve_rows(run)), ""]
    lines += [
        "## How to read this", "",
        "- accuracy: share of problems whose final answer is correct; the interval is the 95 % Wilson interval.",
        "- Costs are per problem. branches: mean branches a problem used; prompt / gen tok: mean prompt and "
        "generated tokens (every branch counted, both models); scored tok: tokens a verifier or step scorer fed to "
        "read its verdict (a judge's reading of the steps is in prompt tok); probe tok: early exit's answer probes "
        "(their text and replies), counted nowhere else; computed tok, the plot's token axis: every token a model "
        "computed -- prompt tokens evaluated (not those shared by a fork or held in the prefix cache), generated, "
        "scored, probed and drafted; "
        "wall s: elapsed time of the run(s) divided by problems (concurrent problems share it); "
        "latency: mean time from a problem's start to its answer; gen tok/s: generated tokens per elapsed second.",
        "- pass@k: unbiased estimator of Chen et al. (2021); maj@k: exact expectation over all k-subsets of the N "
        "samples of a majority vote, ties drawn uniformly among the tied answers, no answer counted as wrong.",
        "- In the plot, maj@k costs the prompt plus k/N of the run's other tokens (exact in expectation) and k/N "
        "of its wall time "
        "(an estimate at the N-sample run's throughput, dashed).",
        "- (replay): the strategy ran on the branches an sc run recorded (`ponder bench --replay`), not on the model: "
        "its stopping rules, cancellations and votes are real, its samples are the recorded ones, and its wall time "
        "is its tokens at the recorded run's seconds per token (hollow markers).",
        "",
    ]
    return "\n".join(lines)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(columns), line(["---"] * len(columns)), *(line(row) for row in rows)])


def write_report(paths: Sequence[str | Path], plot: str | Path | None, console: Console,
                 common: bool = False) -> list[Run]:
    """Print the tables; with ``plot``, also write the PNG there and the Markdown report beside it (``.md``).
    ``common``: only the problems every run finished."""
    runs, warnings = load_runs(paths, common)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    print_report(runs, console)
    if plot is not None:
        png = Path(plot)
        if png.suffix.lower() != ".png":
            raise PonderError(f"--plot writes a PNG; give a path ending in .png, not {png}")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_pareto(runs, png)
        markdown = png.with_suffix(".md")
        markdown.write_text(markdown_report(runs, Path(png.name)), encoding="utf-8")
        console.print(f"wrote {png} and {markdown}")
    return runs


def _axis_number(value: float, _position) -> str:
    """Log-axis tick labels people read at a glance: 0.5, 8, 512, 2,048 (not 2.05e+03)."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"
