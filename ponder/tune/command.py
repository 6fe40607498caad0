"""``ponder tune``: fit ``auto``'s policy to this machine and a dev dataset, and write the profile it reads.

Three steps, each shown as it runs:

1. **Record** a pool of branches per problem for each arm of the model (``ARMS``): its greedy reasoning, its greedy
   program, ``--reasoning-samples`` sampled reasoning branches and ``--program-samples`` sampled programs. Each arm is
   an ordinary ``ponder bench`` run (greedy, pal, sc, pal) into ``DIR/MODEL-ARM.jsonl``: resumable (rerun the command
   to continue), one progress bar per arm, and the same files a ``ponder bench`` of that configuration writes, so
   kept recordings can be copied in under those names instead of recomputed.
2. **Measure** the machine: the seconds of one decode step of 1, 2 and 4 branches and of one prompt token on the
   model (a few seconds; or ``--speed-from PROFILE`` to reuse a profile's measurement without loading a model).
3. **Fit** by replay: every policy of a grid (``policy_grid``: opening arms, the arms added while unsettled, wave
   size, margin, branch cap, program weight) is played on the recorded branches of the first part of the problems with
   exactly the decisions ``auto`` makes live (``ponder.strategies.auto_profile.Policy``), its seconds computed from the
   measured step times (branches of a wave decode together; a cancelled branch is charged the steps it ran). For each
   effort (``low``, ``medium``, ``high``: at most half, one and two times ``--target-s`` seconds per problem) the most
   accurate policy within the time is chosen (the cheapest within one problem of the best), then measured on the
   remaining ``--holdout`` share of the problems, which the fit never saw. The Pareto frontier (accuracy against seconds
   and against tokens per problem) is printed as a table and drawn as a PNG (``--plot``; matplotlib, the ``plot``
   extra), and the profile is written (``--out``, default ``$PONDER_HOME/profile.json``: what ``auto`` reads on this
   machine from then on).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from rich.console import Console

from ..engine.base import Engine, PonderError
from ..strategies.auto_profile import Profile, tuned_path
from .fitting import tune
from .recording import arm_configs, measure_speed, record, recorded
from .reporting import plot, print_tables


def register(subparsers) -> None:
    from ..bench.datasets import DATA_ENV, SHORT_NAMES
    from ..options import add_model_arguments, positive_int

    parser = subparsers.add_parser(
        "tune", help="fit the auto strategy's policy to this machine and a dev dataset; write its profile",
        description=__doc__.split("\n\n", 1)[1].replace("``", "").replace("**", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help=f"dev problems: a JSONL file (id, question, answer) or a short name "
                           f"({', '.join(SHORT_NAMES)}; looked for in ${DATA_ENV} and ../shared/data). Never tune "
                           "on the problems you evaluate on")
    data.add_argument("--limit", type=positive_int, default=100, help="problems to record (default 100)")
    data.add_argument("--offset", type=int, default=0, help="skip this many problems first (default 0)")
    data.add_argument("--holdout", type=float, default=0.3,
                      help="share of the problems held out of the fit and reported on (default 0.3; 0 = fit on all)")
    rec = parser.add_argument_group("recording")
    rec.add_argument("--dir", type=Path, required=True,
                     help="where the recordings go (one results file per arm, resumable: rerun to continue)")
    rec.add_argument("--reasoning-samples", type=positive_int, default=8,
                     help="sampled reasoning branches recorded per problem (default 8)")
    rec.add_argument("--program-samples", type=positive_int, default=4,
                     help="sampled programs recorded per problem (default 4)")
    rec.add_argument("--temperature", type=float, default=0.7, help="of the sampled arms (default 0.7)")
    rec.add_argument("--max-tokens", type=positive_int, default=512, help="per branch (default 512)")
    rec.add_argument("--seed", type=int, default=0, help="(default 0)")
    rec.add_argument("--concurrency", type=positive_int, default=1,
                     help="problems recorded at once (default 1; seconds come from --speed, not from the recording)")
    add_model_arguments(parser)
    fitting = parser.add_argument_group("fit")
    fitting.add_argument("--target-s", type=float, default=30.0,
                         help="seconds per problem the medium effort may spend on this machine (default 30; low: "
                              "half, high: twice)")
    fitting.add_argument("--speed-from", type=Path, metavar="PROFILE",
                         help="take the machine's speed from this profile instead of measuring it (no model is "
                              "loaded when every arm is already recorded)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None,
                     help=f"the profile to write (default {tuned_path()}: what auto reads on this machine)")
    out.add_argument("--plot", type=Path, help="write the Pareto frontier as this PNG (needs ponder[plot])")
    out.add_argument("--name", default=None, help="the profile's name (default: MODEL on DATA)")
    parser.set_defaults(func=tune_command)


def tune_command(args: argparse.Namespace, engine_factory: Callable[[], Engine] | None = None) -> int:
    from ..bench.cli import LOGPROBS_FREE_ON
    from ..bench.datasets import load_dataset
    from ..models import CATALOG, status
    from ..options import engine_from_args

    console = Console(stderr=True, soft_wrap=True)
    if not 0 <= args.holdout < 1:
        raise PonderError(f"--holdout must be at least 0 and below 1, got {args.holdout}")
    if not args.target_s > 0:
        raise PonderError(f"--target-s must be more than 0 seconds, got {args.target_s}")
    dataset = load_dataset(args.data)
    problems = dataset.select(offset=args.offset, limit=args.limit)
    if args.model is None and args.engine == "llamacpp":  # the larger bundled model when it is installed
        args.model = "qwen2.5-1.5b" if status(CATALOG["qwen2.5-1.5b"]).installed else None
    configs = arm_configs(temperature=args.temperature, max_tokens=args.max_tokens,
                          reasoning_samples=args.reasoning_samples, program_samples=args.program_samples,
                          seed=args.seed, logprobs=args.engine in LOGPROBS_FREE_ON)
    speed_from = Profile.read(args.speed_from) if args.speed_from else None
    engine: Engine | None = None
    try:
        model = args.model
        every_arm = all(recorded(args.dir / f"{model}-{name}.jsonl", config, model, problems)
                        for name, config in configs.items())
        if not every_arm or speed_from is None:
            with console.status("loading model…"):
                engine = engine_factory() if engine_factory else engine_from_args(args)
            model = engine.model.name
            files = record(engine, dataset, problems, configs, args.dir, console, concurrency=args.concurrency)
        else:
            files = {name: args.dir / f"{model}-{name}.jsonl" for name in configs}
            console.print(f"every arm is recorded in {args.dir}: nothing to run")
        if speed_from is not None:
            speed = speed_from.speed.get(model) or next(iter(speed_from.speed.values()))
            console.print(f"speed of {model} from {args.speed_from}")
        else:
            with console.status(f"measuring {model}'s decode speed…"):
                speed = measure_speed(engine)
        console.print("speed: " + ", ".join(f"{w} branch{'es' if w != '1' else ''} {s * 1000:.1f} ms/step"
                                            for w, s in speed["step_s"].items())
                      + f", prompt {speed['prompt_s'] * 1000:.2f} ms/token")
    finally:
        if engine is not None:
            engine.close()
    source = {"data": dataset.name, "dataset_sha256": dataset.sha256, "temperature": args.temperature,
              "recordings": {name: str(path) for name, path in files.items()},
              "speed_from": str(args.speed_from) if args.speed_from else "measured"}
    report = tune(files, speed, model=model, holdout=args.holdout, target_s=args.target_s,
                  name=args.name or f"{model} on {dataset.name}", source=source, console=console,
                  order=[p.id for p in problems])
    out_console = Console() if Console().is_terminal else Console(width=160)
    print_tables(report, out_console)
    if args.plot:
        try:
            console.print(f"plot: {plot(report, args.plot)}")
        except ModuleNotFoundError as e:
            if e.name is None or e.name.partition(".")[0] != "matplotlib":
                raise
            raise PonderError('--plot draws with matplotlib, an optional extra: pip install "ponder[plot]"') from None
    path = report.profile.save(args.out or tuned_path())
    how = "on this machine" if args.out is None else f"with --option profile={path}, or PONDER_PROFILE={path}"
    print(f"profile written: {path} (auto reads it {how})")
    return 0
