"""Fitting ``auto``'s policies by replay for ``ponder tune``: the recorded branches of each problem (``load_pool``),
a policy played on them with exactly the decisions ``auto`` makes live (``simulate``, ``score``), the grid of
policies (``policy_grid``), the fit and the choice per effort (``fit``, ``frontier``, ``choose``), and the profile
it all makes (``tune``, returning a ``TuneReport``)."""

from __future__ import annotations

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

from ..engine.base import PonderError
from ..strategies.auto_profile import EFFORTS, Arm, Policy, Profile
from .recording import ARMS

EFFORT_SHARE = {"low": 0.5, "medium": 1.0, "high": 2.0}  # of --target-s


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
    from ..answers import vote
    from ..bench.runner import read_results

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
