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
   size, margin, branch cap, program weight) is played on the recorded branches of the first part of the problems
   with exactly the decisions ``auto`` makes live (``ponder.profile.Policy``), its seconds computed from the measured
   step times (branches of a wave decode together; a cancelled branch is charged the steps it ran). For each effort
   (``low``, ``medium``, ``high``: at most half, one and two times ``--target-s`` seconds per problem) the most
   accurate policy within the time is chosen (the cheapest within one problem of the best), then measured on the
   remaining ``--holdout`` share of the problems, which the fit never saw. The Pareto frontier (accuracy against
   seconds and against tokens per problem) is printed as a table and drawn as a PNG (``--plot``; matplotlib, the
   ``plot`` extra), and the profile is written (``--out``, default ``$PONDER_HOME/profile.json``: what ``auto`` reads
   on this machine from then on).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.table import Table

from .engine.base import Engine, PonderError, SamplingParams, Usage
from .profile import EFFORTS, Arm, Policy, Profile, tuned_path

# The arms a tune records: (name, kind, greedy?, the ponder bench strategy that records it).
ARMS = (("reasoning-greedy", "reasoning", True, "greedy"), ("program-greedy", "program", True, "pal"),
        ("reasoning-sampled", "reasoning", False, "sc"), ("program-sampled", "program", False, "pal"))
EFFORT_SHARE = {"low": 0.5, "medium": 1.0, "high": 2.0}  # of --target-s
SPEED_WIDTHS = (1, 2, 4)


# ---- 1. recording ------------------------------------------------------------------------------------------------

def arm_configs(*, temperature: float, max_tokens: int, reasoning_samples: int, program_samples: int, seed: int,
                logprobs: bool) -> dict:
    """The ``BenchConfig`` recording each arm (the settings of the kept GSM8K recordings with the defaults)."""
    from .bench.runner import BenchConfig

    sampled = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=logprobs)
    configs = {}
    for name, kind, greedy, strategy in ARMS:
        n = 1 if greedy else reasoning_samples if kind == "reasoning" else program_samples
        # greedy decodes at temperature 0 whatever it is given; pal is asked for it
        params = replace(sampled, temperature=0.0) if greedy and strategy == "pal" else sampled
        configs[name] = BenchConfig(strategy, n, params, seed)
    return configs


def record(engine: Engine, dataset, problems, configs: dict, directory: Path, console: Console, *,
           concurrency: int = 1) -> dict[str, Path]:
    """Record every arm into ``directory`` (resuming what is there); returns the file of each arm."""
    from .bench.runner import run_bench

    files = {}
    for name, config in configs.items():
        path = directory / f"{engine.model.name}-{name}.jsonl"
        files[name] = path
        if recorded(path, config, engine.model.name, problems):
            console.print(f"[bold]recorded[/] {name}: every problem is in {path}")
            continue
        console.print(f"[bold]recording[/] {name} ({config.strategy}, {config.n} branch"
                      f"{'es' if config.n > 1 else ''} per problem) into {path}")
        run_bench(engine, dataset, problems, config, path, concurrency=concurrency)
    return files


def recorded(path: Path, config, model: str | None, problems) -> bool:
    """Whether ``path`` already holds ``config``'s branches of every problem on ``model``: the same strategy, number
    of branches, temperature (greedy's aside) and token limit. (A file made by an older ponder, whose header lacks a
    newer sampling field, is still a recording of the arm; ``ponder bench`` would refuse to resume it.)"""
    from .bench.runner import read_results

    if model is None or not path.is_file():
        return False
    try:
        header, records = read_results(path)
    except PonderError:
        return False
    params = header["config"]["params"]
    return (header["strategy"] == config.strategy and header["config"]["n"] == config.n
            and header["model"]["name"] == model and params["max_tokens"] == config.params.max_tokens
            and (config.strategy == "greedy" or params["temperature"] == config.params.temperature)
            and {p.id for p in problems} <= {r["id"] for r in records})


# ---- 2. measuring the machine ------------------------------------------------------------------------------------

async def _measure(engine: Engine, steps: int) -> dict:
    from .prompts import DEFAULT_PROMPT

    usage = Usage()
    warm = await engine.open(DEFAULT_PROMPT.messages("Say hello."), usage)
    await warm.extend(SamplingParams(temperature=0.0, max_tokens=4))
    warm.release()
    question = ("A baker sells {k} loaves on Monday and twice as many on Tuesday, then gives away a third of all the "
                "loaves he sold to a shelter and keeps the rest for the market. How many loaves go to market?")
    speed = {"step_s": {}}
    for width in SPEED_WIDTHS:
        started = time.perf_counter()
        root = await engine.open(DEFAULT_PROMPT.messages(question.format(k=17 + width)), usage)  # a new prompt
        if width == SPEED_WIDTHS[0]:
            speed["prompt_s"] = round((time.perf_counter() - started) / root.context_tokens, 6)
        branches = await root.fork(width)
        started = time.perf_counter()
        await asyncio.gather(*(b.extend(SamplingParams(temperature=0.7, max_tokens=steps, ignore_eos=True, seed=i))
                               for i, b in enumerate(branches)))
        speed["step_s"][str(width)] = round((time.perf_counter() - started) / steps, 6)
        for branch in (root, *branches):
            branch.release()
    return speed


def measure_speed(engine: Engine, steps: int = 32) -> dict:
    """Seconds of one decode step of 1, 2 and 4 branches, and of one prompt token, on the engine's model."""
    return asyncio.run(_measure(engine, steps))


# ---- 3. replaying policies on the recordings ---------------------------------------------------------------------

@dataclass
class Draw:
    """One recorded branch of an arm: its answer class (None: no vote), tokens, and its program's seconds."""

    answer: int | None
    tokens: int
    extra_s: float = 0.0


@dataclass
class Problem:
    id: str
    draws: dict[str, list[Draw]]  # arm -> its recorded branches, in order
    correct: set[int]  # the answer classes that are right
    prompt_tokens: dict[str, int]  # kind -> the prompt's tokens


@dataclass
class Outcome:
    correct: bool
    seconds: float
    tokens: int
    branches: int
    stopped: str


def load_pool(files: dict[str, Path], order: Sequence[str] | None = None) -> list[Problem]:
    """The recorded branches of every problem all arms recorded (in ``order``, the dataset's: default the first
    arm's file order), answers grouped by equivalence across arms."""
    from .answers import vote
    from .bench.runner import read_results

    kinds = {name: kind for name, kind, _, _ in ARMS}
    records = {name: {r["id"]: r for r in read_results(path)[1]} for name, path in files.items()}
    ids = [i for i in (order or records[ARMS[0][0]]) if all(i in recs for recs in records.values())]
    problems = []
    for problem_id in ids:
        branches = {name: records[name][problem_id]["branches"] for name in files}
        flat = [(name, b) for name in files for b in branches[name]]
        answers = [b["answer"] if b["finish_reason"] in ("stop", "length") else None for _, b in flat]
        grouped = vote(answers)
        class_of = {i: c for c, rep in enumerate(grouped.groups) for i in grouped.members[rep]}
        correct = {class_of[i] for i, (_, b) in enumerate(flat) if i in class_of and b["correct"]}
        draws: dict[str, list[Draw]] = {name: [] for name in files}
        for i, (name, b) in enumerate(flat):
            seconds = (b.get("details") or {}).get("seconds") or 0.0
            draws[name].append(Draw(class_of.get(i), b["generated_tokens"], seconds))
        prompt_tokens = {}
        for name in files:
            prompt_tokens.setdefault(kinds[name], records[name][problem_id]["usage"]["prompt_tokens"])
        problems.append(Problem(problem_id, draws, correct, prompt_tokens))
    return problems


def simulate(policy: Policy, problem: Problem, profile: Profile) -> Outcome:
    """``policy`` played on ``problem``'s recorded branches as ``auto`` plays it live: waves decode together, each
    finished branch of an added wave votes at once, the opening votes once all of it has finished, and a settled vote
    cancels the branches still running (charged the steps they ran)."""
    arms = profile.arms
    used = {name: 0 for name in problem.draws}
    opened_pools: set[tuple[str, str]] = set()
    voters: list[tuple[float, int | None]] = []  # (weight, answer class)
    seconds, tokens, branches, stopped = 0.0, 0, 0, None
    opening_voters = 0
    for number, wave in enumerate(policy.waves()):
        opening = number == 0
        draws, names = [], []
        for name in wave:
            recorded = problem.draws[name]
            index = 0 if arms[name].temperature == 0 else used[name]
            if index >= len(recorded):
                continue  # the recording has no more branches of this arm
            used[name] += 1
            draws.append(recorded[index])
            names.append(name)
        if not draws:
            break
        model = arms[names[0]].model
        for name in names:  # a pool's prompt is evaluated the first time one of its arms runs
            pool = (arms[name].model, arms[name].kind)
            if pool not in opened_pools:
                opened_pools.add(pool)
                seconds += problem.prompt_tokens.get(arms[name].kind, 0) * profile.prompt_s(arms[name].model)
        # decode: all branches step together; the shortest finishes first
        order = sorted(range(len(draws)), key=lambda i: draws[i].tokens)
        segments, t, step, width = [], 0.0, 0, len(draws)
        finish = {}
        for i in order:
            step_s = profile.step_s(model, width)
            segments.append((t, step, step_s))
            t += (draws[i].tokens - step) * step_s
            step = draws[i].tokens
            finish[i] = t + (draws[i].extra_s if arms[names[i]].kind == "program" else 0.0)
            width -= 1
        end, cut = max(finish.values()), None
        events = sorted(range(len(draws)), key=lambda i: (finish[i], i))
        if opening:
            voters.extend((arms[names[i]].weight, draws[i].answer) for i in range(len(draws)))
            opening_voters = len(voters)
            stopped = _verdict(policy, voters, opening_voters)
        else:
            for i in events:
                voters.append((arms[names[i]].weight, draws[i].answer))
                stopped = _verdict(policy, voters, opening_voters)
                if stopped is not None:
                    end, cut = finish[i], i
                    break
        done = {i for i in events if finish[i] <= end} | ({cut} if cut is not None else set())
        for i in range(len(draws)):
            tokens += draws[i].tokens if i in done else _steps_at(segments, end, draws[i].tokens)
        branches += len(draws)
        seconds += end
        if stopped is not None:
            break
    winner = _winner(voters)
    return Outcome(winner is not None and winner in problem.correct, seconds, tokens, branches,
                   stopped or "max branches")


def _steps_at(segments: list[tuple[float, int, float]], t: float, tokens: int) -> int:
    """The steps a branch of ``tokens`` tokens had decoded at time ``t``."""
    steps = 0
    for start, step, step_s in segments:
        if start <= t:
            steps = step + int((t - start) / step_s) if step_s > 0 else step
    return min(tokens, steps)


def _verdict(policy: Policy, voters: list[tuple[float, int | None]], opening_voters: int) -> str | None:
    tally: dict[int, float] = {}
    for weight, answer in voters:
        if answer is not None:
            tally[answer] = tally.get(answer, 0.0) + weight
    opening = [a for _, a in voters[:opening_voters]]
    agrees = len(opening) == len(policy.open) and None not in opening and len(set(opening)) == 1
    return policy.stop_reason(list(tally.values()), opened=True, opening_agrees=agrees)


def _winner(voters: list[tuple[float, int | None]]) -> int | None:
    tally: dict[int, float] = {}
    for weight, answer in voters:
        if answer is not None:
            tally[answer] = tally.get(answer, 0.0) + weight
    return max(tally, key=tally.__getitem__) if tally else None  # ties: the first seen, as ponder.answers.vote


@dataclass
class Score:
    accuracy: float
    seconds: float
    tokens: float
    branches: float
    stopped: dict[str, int] = field(default_factory=dict)


def score(policy: Policy, problems: Sequence[Problem], profile: Profile) -> Score:
    outcomes = [simulate(policy, p, profile) for p in problems]
    stopped: dict[str, int] = {}
    for o in outcomes:
        stopped[o.stopped] = stopped.get(o.stopped, 0) + 1
    count = max(len(outcomes), 1)
    return Score(sum(o.correct for o in outcomes) / count, sum(o.seconds for o in outcomes) / count,
                 sum(o.tokens for o in outcomes) / count, sum(o.branches for o in outcomes) / count, stopped)


@dataclass
class Candidate:
    policy: Policy
    program_weight: float
    label: str


def policy_grid() -> list[Candidate]:
    """The policies a tune compares: which greedy arms open (and in which order: a tied vote goes to the first), which
    sampled arms are added while unsettled (in which cycle), how many per wave, the margin that settles, the cap on
    branches, and the weight of a program's vote (reasoning votes 1)."""
    opens = (("reasoning-greedy", "program-greedy"), ("program-greedy", "reasoning-greedy"), ("reasoning-greedy",),
             ("program-greedy",))
    thens = (("reasoning-sampled", "program-sampled"), ("program-sampled", "reasoning-sampled"),
             ("reasoning-sampled",), ("program-sampled",))
    short = {"reasoning-greedy": "R0", "program-greedy": "P0", "reasoning-sampled": "R", "program-sampled": "P"}
    grid = []
    for opening, weight in itertools.product(opens, (0.75, 1.0, 1.25)):
        if weight != 1.0 and len(opening) == 1:
            continue
        name = "+".join(short[a] for a in opening)
        grid.append(Candidate(Policy(opening, (), 1, 2.0, len(opening)), weight, f"{name} w{weight:g}"))
        for then, wave, margin, cap in itertools.product(thens, (1, 2), (1.0, 2.0, 3.0), (3, 4, 5, 6, 8, 10)):
            if cap <= len(opening):
                continue
            label = (f"{name}, then {'/'.join(short[a] for a in then)} x{wave} to margin {margin:g}, cap {cap}, "
                     f"w{weight:g}")
            grid.append(Candidate(Policy(opening, then, wave, margin, cap), weight, label))
    return grid


def weighted(profile: Profile, weight: float) -> Profile:
    """``profile`` with every program arm's vote weighing ``weight``."""
    arms = {name: replace(arm, weight=weight if arm.kind == "program" else 1.0) for name, arm in profile.arms.items()}
    return replace(profile, arms=arms)


@dataclass
class Fitted:
    candidate: Candidate
    tune: Score
    holdout: Score | None = None


def fit(grid: Sequence[Candidate], tune_set: Sequence[Problem], profile: Profile,
        progress: Callable[[int, int], None] | None = None) -> list[Fitted]:
    scored = []
    profiles = {}
    for i, candidate in enumerate(grid):
        if candidate.program_weight not in profiles:
            profiles[candidate.program_weight] = weighted(profile, candidate.program_weight)
        scored.append(Fitted(candidate, score(candidate.policy, tune_set, profiles[candidate.program_weight])))
        if progress is not None:
            progress(i + 1, len(grid))
    return scored


def frontier(fitted: Sequence[Fitted], cost: Callable[[Score], float]) -> list[Fitted]:
    """The Pareto-optimal policies on the tuning problems: none is both as cheap (``cost``) and more accurate."""
    best, ranked = -1.0, []
    for f in sorted(fitted, key=lambda f: (cost(f.tune), -f.tune.accuracy)):
        if f.tune.accuracy > best + 1e-12:
            ranked.append(f)
            best = f.tune.accuracy
    return ranked


def choose(fitted: Sequence[Fitted], seconds: float, problems: int) -> Fitted:
    """The most accurate policy within ``seconds`` per problem; among those within one problem of it, the cheapest."""
    feasible = [f for f in fitted if f.tune.seconds <= seconds] or [min(fitted, key=lambda f: f.tune.seconds)]
    best = max(f.tune.accuracy for f in feasible)
    close = [f for f in feasible if f.tune.accuracy >= best - 1.0 / max(problems, 1) + 1e-12]
    return min(close, key=lambda f: (f.tune.seconds, -f.tune.accuracy))


def sc_curve(problems: Sequence[Problem], profile: Profile, samples: int) -> list[tuple[int, Score]]:
    """Self-consistency over the first k sampled reasoning branches, k = 1..samples, as a point of reference (all
    k decoded together; a tie goes to the first answer seen)."""
    curve = []
    for k in range(1, samples + 1):
        policy = Policy(("reasoning-sampled",) * k, (), 1, 2.0, k)
        curve.append((k, score(policy, problems, weighted(profile, 1.0))))
    return curve


# ---- the command --------------------------------------------------------------------------------------------------

@dataclass
class TuneReport:
    profile: Profile
    chosen: dict[str, Fitted]
    fitted: list[Fitted]
    tune_ids: list[str]
    holdout_ids: list[str]
    sc: list[tuple[int, Score]]


def tune(files: dict[str, Path], speed: dict, *, model: str, holdout: float, target_s: float, name: str,
         source: dict, console: Console, order: Sequence[str] | None = None) -> TuneReport:
    """Fit the policies on the recordings ``files`` (one per arm) and the measured ``speed`` of ``model``: on the
    first part of the problems (in ``order``), reporting on the rest."""
    problems = load_pool(files, order)
    if len(problems) < 2:
        raise PonderError(f"tuning needs at least 2 problems recorded by every arm, found {len(problems)}")
    cut = min(len(problems) - 1, max(1, math.ceil(len(problems) * (1 - holdout)))) if holdout > 0 else len(problems)
    tune_set, holdout_set = problems[:cut], problems[cut:]
    tokens = {arm: statistics.fmean(d.tokens for p in problems for d in p.draws[arm]) for arm in files}
    program_s = [d.extra_s for p in problems for arm in files for d in p.draws[arm] if d.extra_s]
    kinds = {arm: kind for arm, kind, _, _ in ARMS}
    temperatures = {arm: 0.0 if greedy else None for arm, _, greedy, _ in ARMS}
    profile = Profile(
        name=name,
        arms={arm: Arm(arm, model, kinds[arm], temperatures[arm] if temperatures[arm] is not None
                       else source["temperature"], tokens=round(tokens[arm], 1)) for arm in files},
        policies={}, speed={model: speed}, program_s=round(statistics.fmean(program_s), 4) if program_s else 0.1)
    grid = policy_grid()
    console.print(f"[bold]fitting[/] {len(grid)} policies by replay on {len(tune_set)} problems "
                  f"({len(holdout_set)} held out)")
    started = time.perf_counter()
    fitted = fit(grid, tune_set, profile)
    console.print(f"  replayed in {time.perf_counter() - started:.1f} s")
    chosen = {effort: choose(fitted, target_s * EFFORT_SHARE[effort], len(tune_set)) for effort in EFFORTS}
    for f in {id(f): f for f in chosen.values()}.values():
        if holdout_set:
            f.holdout = score(f.candidate.policy, holdout_set, weighted(profile, f.candidate.program_weight))
    medium = chosen["medium"].candidate
    weight = medium.program_weight
    profile = weighted(profile, weight)  # one weight per arm: the medium policy's
    profile.policies = {effort: f.candidate.policy for effort, f in chosen.items()}

    def figures(s: Score | None) -> dict | None:
        return None if s is None else {"accuracy": round(s.accuracy, 4), "seconds": round(s.seconds, 2),
                                       "tokens": round(s.tokens, 1), "branches": round(s.branches, 2),
                                       "stopped": s.stopped}

    profile.tuned = {
        **source, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tuning_problems": [tune_set[0].id, tune_set[-1].id, len(tune_set)],
        "holdout_problems": [holdout_set[0].id, holdout_set[-1].id, len(holdout_set)] if holdout_set else None,
        "target_s": target_s, "cpus": os.cpu_count(),
        "figures": {effort: {"policy": f.candidate.label, "tuning": figures(f.tune), "holdout": figures(f.holdout)}
                    for effort, f in chosen.items()},
        "note": (f"policies other than medium's vote with program weight {weight:g}" if any(
            f.candidate.program_weight != weight for f in chosen.values()) else None),
    }
    samples = len(problems[0].draws.get("reasoning-sampled", []))
    sc = sc_curve(tune_set, profile, samples) if samples else []
    return TuneReport(profile, chosen, fitted, [p.id for p in tune_set], [p.id for p in holdout_set], sc)


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


def register(subparsers) -> None:
    from .bench.datasets import DATA_ENV, SHORT_NAMES
    from .options import add_model_arguments, positive_int

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
    from .bench.cli import LOGPROBS_FREE_ON
    from .bench.datasets import load_dataset
    from .models import CATALOG, status
    from .options import engine_from_args

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

