"""The ``ponder bench`` and ``ponder report`` subcommands; ``register`` adds them to ponder's argparse CLI."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from ..engine.base import PonderError
from ..options import (add_model_arguments, add_prompt_arguments, add_sampling_arguments, engine_from_args,
                       positive_int, prompt_from_args, sampling_params, strategy_options)
from .datasets import DATA_ENV, SHORT_NAMES, load_dataset

# Engines that compute every token's logprob anyway (the in-process one holds the logits it samples from): recording
# them costs nothing there. A remote server may charge dearly for them: llama-cpp-python's sorts the whole vocabulary
# in Python for every token, which made a 4-sample sc ten times slower.
LOGPROBS_FREE_ON = ("llamacpp",)


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="run a strategy over a dataset into a resumable results file",
        description="Run one strategy configuration over a dataset. Each finished problem is appended to --out at "
                    "once; rerunning the same command resumes where it stopped.")
    data = bench.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help=f"a JSONL file (id, question, answer), a short name ({', '.join(SHORT_NAMES)}; looked "
                           f"for in ${DATA_ENV} and ../shared/data) or gym:NAME?seed=S&size=K (reasoning-gym: "
                           'pip install "ponder[gym]")')
    data.add_argument("--limit", type=positive_int, help="run at most this many problems")
    data.add_argument("--offset", type=int, default=0, help="skip this many problems first (default 0)")
    data.add_argument("--shuffle", action="store_true", help="shuffle the problems with --seed before --offset")
    add_sampling_arguments(bench, n_default=8, max_tokens_default=1024)
    add_prompt_arguments(bench)  # recorded in the results header: runs with other prompts are other runs
    # A benchmark is always seeded: the seed fixes the shuffle and every problem's samples, so a resumed run
    # continues the same measurement.
    bench.set_defaults(seed=0)
    bench.add_argument("--top-logprobs", type=int, default=0,
                       help="also record each branch's mean confidence over the top K logprobs (DeepConf); 0 = off")
    bench.add_argument("--record-logprobs", action=argparse.BooleanOptionalAction, default=None,
                       help="record each branch's mean token logprob even when the strategy does not need it (for "
                            "weighted re-votes and replays of the results file). Default: on with the in-process "
                            "engine, where it is free; off with --engine openai, where it can make a server many "
                            "times slower. Strategies that need logprobs ask for them either way")
    add_model_arguments(bench)
    run = bench.add_argument_group("run")
    run.add_argument("--concurrency", type=positive_int, default=1,
                     help="problems in flight at once; their branches share the engine's batch (default 1)")
    run.add_argument("--out", required=True, type=Path, help="the results file (JSONL) to create or resume")
    run.add_argument("--replay", type=Path, metavar="RESULTS", action="append",
                     help="instead of the model, play back the branches an sc run recorded in RESULTS (same --data, "
                          "sampling and seed): evaluates stopping rules and votes in seconds; not for what needs "
                          "per-token confidences (deepconf, self-certainty) or verifier=self. Repeat it with another "
                          "model's run (e.g. the 1.5B's greedy run) for strategies that open that model (cascade)")
    bench.set_defaults(func=bench_command)

    report = subparsers.add_parser(
        "report", help="compare results files: table, Pareto plot and Markdown report",
        description="Print a table of the runs in the results files; with --plot, also write a PNG of accuracy vs "
                    "tokens computed (prompt evaluated, generated, scored, probed; every model counted) and vs wall "
                    "time per problem, and a Markdown report beside it. Needs "
                    'matplotlib: pip install "ponder[plot]".')
    report.add_argument("results", nargs="+", type=Path, help="results files written by ponder bench")
    report.add_argument("--plot", type=Path, help="the PNG to write; the Markdown report goes beside it (.md)")
    report.add_argument("--common-problems", action="store_true",
                        help="measure every run only on the problems all of them finished (e.g. to compare a "
                             "partial run with a full one)")
    report.set_defaults(func=report_command)


def bench_command(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the strategies pull in scipy (most of a second), which `ponder --help` and the
    # other subcommands should not wait for.
    from .metrics import summarize
    from .runner import BenchConfig, check_config, run_bench

    try:
        dataset = load_dataset(args.data)
        problems = dataset.select(offset=args.offset, limit=args.limit, shuffle=args.shuffle, seed=args.seed)
        # Where logprobs are free, every branch records its mean logprob so results files can be re-analysed (and
        # replayed with logprob weightings) without rerunning.
        record = args.record_logprobs if args.record_logprobs is not None else args.engine in LOGPROBS_FREE_ON
        params = replace(sampling_params(args), logprobs=record, top_logprobs=args.top_logprobs).validate()
        # checked before the model loads, so a typo fails in a second
        config = check_config(BenchConfig(args.strategy, args.n, params, args.seed, strategy_options(args.option),
                                          prompt_from_args(args)))
        if args.replay is None:
            engine, replay = engine_from_args(args), {}
        else:
            engine = _replay_engine(args, dataset, problems, config)
            replay = {"replay": engine.description(), "clock": engine.now}
        try:
            results = run_bench(engine, dataset, problems, config, args.out, concurrency=args.concurrency, **replay)
        except KeyboardInterrupt:
            print(f"interrupted: the finished problems are saved in {args.out}; rerun the same command to resume")
            return 130
        finally:
            engine.close()
    except OSError as e:
        raise PonderError(f"{e.filename or args.out}: {e.strerror}") from None
    metrics = summarize(config.strategy, results.records)
    low, high = metrics.ci95
    print(f"{args.out}: {metrics.problems} problems ({results.resumed} resumed), accuracy "
          f"{metrics.accuracy:.1%} [{low:.1%}, {high:.1%}] (95 % CI), "
          f"{metrics.generated_tokens:.0f} generated tokens and {metrics.wall_s:.2f} s per problem")
    if metrics.maj_at_k is not None:
        n = metrics.samples
        print(f"from the same samples: maj@1 {metrics.maj_at_k[0]:.1%}, maj@{n} {metrics.maj_at_k[-1]:.1%}, "
              f"pass@{n} {metrics.pass_at_k[-1]:.1%} (ponder report shows every k)")
    return 0


def _replay_engine(args: argparse.Namespace, dataset, problems, config):
    from .replay import ReplayEngine

    if args.model or args.base_url or args.chat_template or args.engine != "llamacpp":
        raise PonderError("--replay plays back the recorded model's branches; drop --model/--engine/--base-url")
    engine = ReplayEngine(args.replay, dataset)
    engine.check(config.params, config.n, config.seed)
    missing = [p.id for p in problems if p.id not in engine.problems]
    if missing:
        raise PonderError(f"{args.replay[0]} has no recording of {len(missing)} of the selected problems "
                          f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); select the recorded ones "
                          "with --offset/--limit")
    return engine


def report_command(args: argparse.Namespace) -> int:
    try:
        # matplotlib loads in about half a second, and is an optional extra: only a plot pays for it
        from .report import write_report

        write_report(args.results, args.plot, _console(), common=args.common_problems)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "matplotlib":
            raise
        raise PonderError('ponder report --plot draws with matplotlib, an optional extra: '
                          'pip install "ponder[plot]"') from None
    except OSError as e:
        raise PonderError(f"{e.filename or args.plot}: {e.strerror}") from None
    return 0


def _console() -> Console:
    console = Console()
    # Rich wraps at 80 columns when stdout is a file or pipe; the run table needs more.
    return console if console.is_terminal else Console(width=140)
