"""Train and measure a correctness probe from recorded runs: ``ponder probe train RESULTS...``.

1. **Branches**: the results files of ``ponder bench`` (one model, any strategy that samples whole solutions: sc,
   pal, ...) keep every branch's text, answer and correctness. The first ``--per-problem`` branches that ended on
   their own of the first ``--problems`` problems of each file are used.
2. **Hidden states**: each problem's prompt (the recorded strategy's chat under the recorded prompt) is evaluated
   once, every branch's text appended to a fork of it (a prefill: no sampling), and the final hidden state read at
   its end (``Branch.hidden``). The vectors go to a cache file (``--cache``, one ``.npz`` per model) after every
   problem, so reading can stop (``--max-minutes``) and resume: rerun the same command.
3. **Fit**: L2-regularised logistic regression on standardised vectors (scipy's L-BFGS; no extra dependency), the
   strength ``C`` chosen by cross-validation grouped by problem.
4. **Measure, held out by problem**: the problems are split into ``--folds`` groups; each group's branches are scored
   by a probe fitted on the other groups only (its ``C`` chosen inside them). Reported, per dataset and in all:
   AUROC of the probe and of the branch's mean token log-probability (recorded) on the same branches;
   within-question pick accuracy on problems whose answered branches disagree in correctness (the top-scored
   answered branch is right?); and, at equal N (the branches read), the accuracy of majority vote, of best-of-N by
   the probe, of a probe-weighted vote and of a logprob-weighted vote.
5. **Save**: a probe fitted on every problem read, as ``<sha256>.json`` in ``--out`` (default: the package's probe
   directory), with the data, the chosen ``C``, the held-out figures and the command in its ``trained`` field.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..answers import vote
from ..engine.base import PonderError
from . import PACKAGE_DIR, Probe

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
DEFAULT_CACHE = Path("benchmarks/results/probe/hidden")


@dataclass
class Sample:
    key: str  # "<file sha256[:12]>:<problem id>:<branch index>"
    dataset: str
    problem: str
    text: str
    chat: list
    answer: str | None
    correct: bool
    mean_logprob: float | None


# ---- the branches of recorded runs ------------------------------------------------------------------------------

def collect(paths: list[Path], per_problem: int, problems: int | None) -> tuple[dict, list[Sample]]:
    """The model header shared by every file and the branches to read."""
    from ..bench.datasets import load_dataset
    from ..bench.runner import read_results, run_prompt
    from ..strategies import STRATEGIES

    model, samples = None, []
    for path in paths:
        header, records = read_results(path)
        if model is None:
            model = header["model"]
        elif header["model"]["sha256"] != model["sha256"]:
            raise PonderError(f"{path} was recorded on {header['model']['name']}, the other files on {model['name']}: "
                              f"a probe is trained for one model at a time")
        strategy = STRATEGIES.get(header["strategy"])
        if strategy is None:
            raise PonderError(f"{path}: strategy {header['strategy']!r} is unknown to this ponder")
        questions = {p.id: p.question for p in load_dataset(header["dataset"]["source"]).problems}
        prompt = run_prompt(header)
        tag = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for record in [r for r in records if "branches" in r][:problems]:
            if record["id"] not in questions:
                raise PonderError(f"{path}: problem {record['id']} is not in {header['dataset']['source']}")
            chat = strategy.chat(questions[record["id"]], prompt)
            ended = [(i, b) for i, b in enumerate(record["branches"]) if b.get("finish_reason") in ("stop", "length")]
            for i, b in ended[:per_problem]:
                samples.append(Sample(f"{tag}:{record['id']}:{i}", header["dataset"]["name"], record["id"],
                                      b["text"], chat, b.get("answer"), bool(b.get("correct")),
                                      b.get("mean_logprob")))
    if model is None:
        raise PonderError("no results files given")
    return model, samples


class HiddenCache:
    """Hidden states read so far, by sample key, in one .npz file per model (rewritten whole after each problem)."""

    def __init__(self, directory: Path, sha256: str):
        self.path = directory / f"{sha256}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path) as data:
                self.vectors = {key: data[key] for key in data.files}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **self.vectors)
        tmp.replace(self.path)


async def _read_problem(engine, chat, samples: list[Sample]) -> list[np.ndarray]:
    root = await engine.open(chat)
    try:
        forks = await root.fork(len(samples))
    finally:
        root.release()

    async def one(branch, sample):
        try:
            await branch.append(sample.text)
            return np.array(await branch.hidden(), dtype=np.float32)
        finally:
            branch.release()

    return await asyncio.gather(*(one(b, s) for b, s in zip(forks, samples)))


def read_hidden(model: dict, samples: list[Sample], cache: HiddenCache, max_seconds: float | None,
                concurrency: int = 2, log=print) -> int:
    """Read the hidden states of the samples the cache lacks, problem by problem, until ``max_seconds``; return how
    many are still missing."""
    todo: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        if s.key not in cache.vectors:
            todo.setdefault((s.key.split(":")[0], s.problem), []).append(s)
    if not todo:
        return 0
    from ..models import load_engine

    engine = load_engine(model["name"], seed=0)
    if engine.model.sha256 != model["sha256"]:
        engine.close()
        raise PonderError(f"the results were recorded on {model['name']} with sha256 {model['sha256'][:12]}…, the "
                          f"installed one has {str(engine.model.sha256)[:12]}…")
    start, tokens_before = time.perf_counter(), engine.stats().prefill_tokens
    groups = list(todo.values())

    async def run() -> None:
        pending = list(groups)
        while pending and (max_seconds is None or time.perf_counter() - start < max_seconds):
            batch, pending = pending[:concurrency], pending[concurrency:]
            results = await asyncio.gather(*(_read_problem(engine, g[0].chat, g) for g in batch))
            for group, vectors in zip(batch, results):
                for s, v in zip(group, vectors):
                    cache.vectors[s.key] = v
            cache.save()
            done = len(groups) - len(pending)
            elapsed = time.perf_counter() - start
            fed = engine.stats().prefill_tokens - tokens_before
            log(f"  read {done}/{len(groups)} problems, {fed} tokens in {elapsed:.0f} s ({fed / elapsed:.0f} tok/s)")

    try:
        asyncio.run(run())
    finally:
        engine.close()
    return sum(1 for s in samples if s.key not in cache.vectors)


# ---- fitting and measuring ----------------------------------------------------------------------------------------

def fit_logistic(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (scikit-learn's objective: |w|^2 / 2 + C * sum of log-losses) on the raw
    vectors, standardised inside; returns weights and bias for the raw vectors."""
    from scipy.optimize import minimize

    mean, scale = X.mean(axis=0), X.std(axis=0) + 1e-6
    Z = (X - mean) / scale
    t = np.where(y, 1.0, -1.0)

    def loss(params):
        w, b = params[:-1], params[-1]
        m = t * (Z @ w + b)
        value = 0.5 * w @ w + C * np.logaddexp(0.0, -m).sum()
        g = -C * t / (1.0 + np.exp(np.clip(m, -700, 700)))
        return value, np.append(w + Z.T @ g, g.sum())

    fit = minimize(loss, np.zeros(Z.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    w, b = fit.x[:-1], fit.x[-1]
    return w / scale, float(b - (w / scale) @ mean)


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def folds_of(problems: list[str], k: int, seed: int) -> dict[str, int]:
    unique = sorted(set(problems))
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    return {p: i % k for i, p in enumerate(unique)}


def choose_C(X, y, groups: list[str], seed: int, inner: int = 3) -> float:
    """The C of ``C_GRID`` with the best pooled AUROC over an ``inner``-fold split by problem of (X, y)."""
    fold = folds_of(groups, inner, seed)
    f = np.array([fold[g] for g in groups])
    best, best_auc = C_GRID[0], -1.0
    for C in C_GRID:
        scores = np.zeros(len(y))
        for k in range(inner):
            train, test = f != k, f == k
            if test.sum() == 0 or len(set(y[train])) < 2:
                continue
            w, b = fit_logistic(X[train], y[train], C)
            scores[test] = X[test] @ w + b
        value = auroc(scores, y) or 0.0
        if value > best_auc:
            best, best_auc = C, value
    return best


def held_out_scores(X, y, groups: list[str], k: int, seed: int) -> tuple[np.ndarray, list[float]]:
    """Each sample's probe logit from a probe fitted without its problem's fold; the C chosen in each fold."""
    fold = folds_of(groups, k, seed)
    f = np.array([fold[g] for g in groups])
    scores, chosen = np.zeros(len(y)), []
    for i in range(k):
        train, test = f != i, f == i
        if test.sum() == 0:
            continue
        C = choose_C(X[train], y[train], [g for g, t in zip(groups, train) if t], seed + 1 + i)
        chosen.append(C)
        w, b = fit_logistic(X[train], y[train], C)
        scores[test] = X[test] @ w + b
    return scores, chosen


def measure(samples: list[Sample], probe_scores: np.ndarray) -> dict:
    """AUROC, within-question pick accuracy and equal-N vote accuracies of the probe against mean logprob."""
    labels = np.array([s.correct for s in samples])
    logprob = np.array([s.mean_logprob if s.mean_logprob is not None else -1e9 for s in samples])
    by_problem: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_problem.setdefault(f"{s.dataset}:{s.problem}", []).append(i)
    picks = {"probe": 0, "logprob": 0, "random": 0.0}
    mixed = 0
    votes = {"majority": 0, "majority_probe_breaks_ties": 0, "probe_bon": 0, "probe_weighted": 0,
             "logprob_weighted": 0, "logprob_bon": 0, "first_branch": 0, "pass": 0}
    stops = {t: [0, 0] for t in STOP_THRESHOLDS}  # threshold -> [right, branches used]
    prob = 1.0 / (1.0 + np.exp(-np.clip(probe_scores, -700, 700)))
    for idx in by_problem.values():
        answered = [i for i in idx if samples[i].answer is not None]
        votes["pass"] += any(labels[i] for i in answered)
        if not answered:
            continue
        answers = [samples[i].answer for i in answered]

        def won(weights) -> bool:
            ballot = vote(answers, weights)
            return bool(labels[answered[ballot.members[ballot.winner][0]]])

        votes["majority"] += won(None)
        votes["majority_probe_breaks_ties"] += won([1.0 + 1e-6 * float(prob[i]) for i in answered])
        votes["first_branch"] += bool(labels[idx[0]]) and samples[idx[0]].answer is not None
        for t in STOP_THRESHOLDS:  # stop after the first branch when the probe trusts it, else vote over all
            first = idx[0]
            if samples[first].answer is not None and prob[first] >= t:
                stops[t][0] += bool(labels[first])
                stops[t][1] += 1
            else:
                stops[t][0] += won([1.0 + 1e-6 * float(prob[i]) for i in answered])
                stops[t][1] += len(idx)
        votes["probe_weighted"] += won([float(prob[i]) for i in answered])
        votes["logprob_weighted"] += won([float(np.exp(logprob[i])) for i in answered])
        best = max(answered, key=lambda i: probe_scores[i])
        votes["probe_bon"] += bool(labels[best])
        votes["logprob_bon"] += bool(labels[max(answered, key=lambda i: logprob[i])])
        if len({bool(labels[i]) for i in answered}) == 2:
            mixed += 1
            picks["probe"] += bool(labels[best])
            picks["logprob"] += bool(labels[max(answered, key=lambda i: logprob[i])])
            picks["random"] += float(np.mean([labels[i] for i in answered]))
    n = len(by_problem)
    per = [len(v) for v in by_problem.values()]
    return {
        "problems": n, "branches": len(samples), "branches_per_problem": round(float(np.mean(per)), 2),
        "right_share": round(float(labels.mean()), 4),
        "auroc": {"probe": _round(auroc(probe_scores, labels)), "mean_logprob": _round(auroc(logprob, labels))},
        "pick_accuracy": {"problems_with_right_and_wrong": mixed,
                          **{k: _round(v / mixed if mixed else None) for k, v in picks.items()}},
        "accuracy_at_equal_n": {k: round(v / n, 4) for k, v in votes.items()},
        "stop_after_first_if_probe_at_least": {str(t): {"accuracy": round(r / n, 4), "branches": round(b / n, 2)}
                                                for t, (r, b) in stops.items()},
    }


STOP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _round(x):
    return None if x is None else round(float(x), 4)


def evaluate(samples: list[Sample], X: np.ndarray, folds: int, seed: int) -> tuple[dict, list[float]]:
    y = np.array([s.correct for s in samples])
    groups = [f"{s.dataset}:{s.problem}" for s in samples]
    scores, chosen = held_out_scores(X, y, groups, folds, seed)
    report = {"all": measure(samples, scores)}
    # The same probe with the branch's mean token logprob (free on the in-process engine) as one more feature:
    # measured only, to see how much of the ranking the two signals share.
    logprob = np.array([[s.mean_logprob if s.mean_logprob is not None else 0.0] for s in samples])
    with_logprob, _ = held_out_scores(np.hstack([X, logprob]), y, groups, folds, seed)
    both = measure(samples, with_logprob)
    report["all"]["probe_and_logprob"] = {
        "auroc": both["auroc"]["probe"], "pick_accuracy": both["pick_accuracy"]["probe"],
        "probe_bon": both["accuracy_at_equal_n"]["probe_bon"],
        "probe_weighted": both["accuracy_at_equal_n"]["probe_weighted"]}
    datasets = sorted({s.dataset for s in samples})
    if len(datasets) > 1:
        for d in datasets:
            keep = [i for i, s in enumerate(samples) if s.dataset == d]
            report[d] = measure([samples[i] for i in keep], scores[keep])
    return report, chosen


# ---- the command ----------------------------------------------------------------------------------------------------

def train_command(args) -> int:
    from rich.console import Console

    out = Console(stderr=True, highlight=False)
    log = lambda text: out.print(text, markup=False)  # noqa: E731
    model, samples = collect(args.results, args.per_problem, args.problems)
    cache = HiddenCache(args.cache, model["sha256"])
    log(f"{model['name']}: {len(samples)} branches of {len({(s.dataset, s.problem) for s in samples})} problems "
        f"from {len(args.results)} file(s); {sum(s.key in cache.vectors for s in samples)} already read")
    missing = read_hidden(model, samples, cache, args.max_minutes * 60 if args.max_minutes else None,
                          log=log)
    if missing:
        log(f"{missing} branches still to read: rerun the same command to continue")
        return 3
    X = np.stack([cache.vectors[s.key] for s in samples]).astype(np.float64)
    y = np.array([s.correct for s in samples])
    if len(set(y)) < 2:
        raise PonderError("the branches are all right or all wrong: a probe needs both")
    report, chosen = evaluate(samples, X, args.folds, args.seed)
    C = choose_C(X, y, [f"{s.dataset}:{s.problem}" for s in samples], args.seed)
    weights, bias = fit_logistic(X, y, C)
    command = " ".join(["ponder probe train", *(shlex.quote(str(p)) for p in args.results),
                        f"--per-problem {args.per_problem}",
                        *([f"--problems {args.problems}"] if args.problems else []),
                        f"--folds {args.folds}", f"--seed {args.seed}"])
    trained = {"data": [str(p) for p in args.results], "per_problem": args.per_problem, "problems": args.problems,
               "branches": len(samples), "C": C, "held_out": report, "folds": args.folds, "fold_C": chosen,
               "seed": args.seed, "command": command,
               "features": "final hidden state (after the output norm) at the end of the branch's text"}
    probe = Probe(model=model["name"], sha256=model["sha256"], weights=weights, bias=bias, trained=trained)
    summary = {"model": model["name"], "sha256": model["sha256"], **trained}
    print(json.dumps(summary["held_out"], indent=1))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(summary, indent=1) + "\n")
        log(f"report: {args.report}")
    if not args.no_save:
        log(f"probe: {probe.save(args.out)}")
    return 0


def register(subparsers) -> None:
    import argparse

    from ..options import positive_int

    probe = subparsers.add_parser("probe", help="correctness probes on hidden states: train and measure",
                                  description="Correctness probes: a linear read-out of a model's final hidden "
                                              "state that predicts whether a branch's answer is right.")
    sub = probe.add_subparsers(dest="probe_command", metavar="SUBCOMMAND", required=True)
    train = sub.add_parser("train", help="fit a probe from recorded runs and measure it on held-out problems",
                           description=__doc__.split("\n\n", 1)[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("results", nargs="+", type=Path, help="results files of ponder bench, all of one model")
    train.add_argument("--per-problem", type=positive_int, default=4,
                       help="branches read per problem: the first that ended on their own (default 4)")
    train.add_argument("--problems", type=positive_int, help="the first this many problems of each file (default all)")
    train.add_argument("--folds", type=positive_int, default=5, help="held-out groups of problems (default 5)")
    train.add_argument("--seed", type=int, default=0, help="fixes the split into folds (default 0)")
    train.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                       help=f"directory of the hidden states read, one .npz per model (default {DEFAULT_CACHE})")
    train.add_argument("--max-minutes", type=float, help="stop reading after this long; rerun to continue")
    train.add_argument("--out", type=Path, default=PACKAGE_DIR,
                       help="directory (or file) to write <sha256>.json to (default: the package's probes)")
    train.add_argument("--report", type=Path, help="also write the held-out figures to this JSON file")
    train.add_argument("--no-save", action="store_true", help="measure only; write no probe")
    train.set_defaults(func=train_command)
