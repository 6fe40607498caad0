"""Reporting a ``ponder tune``: the Pareto frontier and the chosen policies as tables (``print_tables``) and as a
PNG (``plot``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .fitting import TuneReport, frontier


def print_tables(report: TuneReport, console: Console) -> None:
    chosen_ids = {id(f): effort for effort, f in report.chosen.items()}
    table = Table(title=f"Pareto frontier on the {len(report.tune_ids)} tuning problems (accuracy against seconds "
                        "per problem); ← chosen for an effort", title_justify="left")
    for column in ("policy", "accuracy", "s / problem", "tokens / problem", "branches", "effort"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for f in frontier(report.fitted, lambda s: s.seconds):
        table.add_row(f.candidate.label, f"{f.tune.accuracy:.1%}", f"{f.tune.seconds:.1f}", f"{f.tune.tokens:.0f}",
                      f"{f.tune.branches:.1f}", f"← {chosen_ids[id(f)]}" if id(f) in chosen_ids else "")
    console.print(table)
    by_tokens = frontier(report.fitted, lambda s: s.tokens)
    console.print(f"Pareto frontier against tokens: {len(by_tokens)} policies, from "
                  f"{by_tokens[0].tune.accuracy:.1%} at {by_tokens[0].tune.tokens:.0f} tokens to "
                  f"{by_tokens[-1].tune.accuracy:.1%} at {by_tokens[-1].tune.tokens:.0f} (the PNG draws both)")
    if report.sc:
        console.print("self-consistency on the sampled reasoning branches, same problems: " + ", ".join(
            f"maj@{k} {s.accuracy:.1%} ({s.seconds:.0f} s, {s.tokens:.0f} tok)" for k, s in report.sc))
    chosen = Table(title="chosen policies: fitted on the tuning problems, then measured on the held-out ones",
                   title_justify="left")
    for column in ("effort", "policy", "tuning acc", "s", "tokens", "held-out acc", "s", "tokens",
                   "stopped (held out)"):
        chosen.add_column(column)
    for effort, f in report.chosen.items():
        h = f.holdout
        chosen.add_row(effort, f.candidate.label, f"{f.tune.accuracy:.1%}", f"{f.tune.seconds:.1f}",
                       f"{f.tune.tokens:.0f}", *(("-", "-", "-", "-") if h is None else (
                           f"{h.accuracy:.1%}", f"{h.seconds:.1f}", f"{h.tokens:.0f}",
                           ", ".join(f"{k} {v}" for k, v in h.stopped.items()))))
    console.print(chosen)


def plot(report: TuneReport, path: Path) -> Path:
    from matplotlib.figure import Figure  # the `plot` extra

    figure = Figure(figsize=(12, 5), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, cost, label in ((axes[0], lambda s: s.seconds, "seconds per problem (measured step times)"),
                            (axes[1], lambda s: s.tokens, "generated tokens per problem")):
        ax.scatter([cost(f.tune) for f in report.fitted], [f.tune.accuracy for f in report.fitted], s=6,
                   color="0.8", label="policies (tuning problems)")
        front = frontier(report.fitted, cost)
        ax.plot([cost(f.tune) for f in front], [f.tune.accuracy for f in front], "-o", ms=3, color="tab:blue",
                label="Pareto frontier (tuning problems)")
        if report.sc:
            ax.plot([cost(s) for _, s in report.sc], [s.accuracy for _, s in report.sc], "--s", ms=3,
                    color="tab:red", label="sc maj@k (tuning problems)")
        for effort, f in report.chosen.items():
            ax.scatter([cost(f.tune)], [f.tune.accuracy], marker="*", s=120, color="tab:orange", zorder=3)
            ax.annotate(effort, (cost(f.tune), f.tune.accuracy), textcoords="offset points", xytext=(5, 5))
            if f.holdout is not None:
                ax.scatter([cost(f.holdout)], [f.holdout.accuracy], marker="*", s=120, facecolors="none",
                           edgecolors="tab:green", zorder=3)
        ax.scatter([], [], marker="*", s=120, color="tab:orange", label="chosen (tuning problems)")
        ax.scatter([], [], marker="*", s=120, facecolors="none", edgecolors="tab:green",
                   label="chosen (held-out problems)")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle(f"ponder tune: {report.profile.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
