"""Statistics of a results file: accuracy with a Wilson interval, cost per problem, and pass@k / maj@k curves.

pass@k and maj@k are computed for every k = 1..N from the N samples of one run, as the exact expectation over the
C(N, k) subsets of k samples (no resampling, no Monte Carlo):

* pass@k -- the unbiased estimator of Chen et al. (2021): ``1 - C(N - c, k) / C(N, k)`` for c correct samples.
* maj@k -- the probability that a majority vote over a uniformly random k-subset picks a correct answer. Samples are
  grouped into answer classes (equivalent answers, see ``ponder.answers.vote``); samples without an answer abstain.
  **Tie rule:** when several classes share the top count, the winner is drawn uniformly among them; a subset of only
  abstentions has no answer and counts as wrong. (A strategy's own vote breaks ties by first-seen answer instead, so
  maj@N can differ slightly from the run's accuracy when its votes tie.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal quantile of 0.975


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95 % by default)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # The interval always contains p; the clamps only remove rounding error at p = 0 and p = 1.
    return (min(p, max(0.0, center - half)), max(p, min(1.0, center + half)))


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (``correct`` of them right) is
    right."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def maj_at_k(class_sizes: Sequence[int], class_correct: Sequence[bool], abstained: int = 0) -> list[float]:
    """maj@k for k = 1..N (element k-1), N = sum(class_sizes) + abstained; see the module docstring for the rule."""
    if len(class_sizes) != len(class_correct):
        raise ValueError("class_sizes and class_correct must have the same length")
    # Order does not matter, so sort: problems with the same vote profile share one cache entry.
    profile = tuple(sorted(zip(class_sizes, class_correct)))
    return list(_maj_at_k(profile, abstained))


@lru_cache(maxsize=4096)
def _maj_at_k(profile: tuple[tuple[int, bool], ...], abstained: int) -> tuple[float, ...]:
    sizes = [size for size, _ in profile]
    n = sum(sizes) + abstained
    if n == 0:
        return ()
    # wins[k] = number of k-subsets (weighted by the tie-break probability) in which a correct class wins.
    wins = np.zeros(n + 1)
    abstain_ways = np.array([math.comb(abstained, x) for x in range(n + 1)], dtype=float)
    for j, (size_j, correct_j) in enumerate(profile):
        if not correct_j:
            continue
        others = sizes[:j] + sizes[j + 1:]
        for v in range(1, size_j + 1):  # class j gets exactly v votes in the subset
            # ways[s, t]: subsets of s samples from the other classes, each class taking at most v, t of them
            # exactly v (tied with class j).
            ways = np.zeros((n + 1, len(others) + 1))
            ways[0, 0] = 1.0
            for size in others:
                step = np.zeros_like(ways)
                for x in range(min(size, v) + 1):
                    weight = math.comb(size, x)
                    if x < v:
                        step[x:, :] += weight * ways[: n + 1 - x, :]
                    else:
                        step[x:, 1:] += weight * ways[: n + 1 - x, :-1]
                ways = step
            tie_share = ways @ (1.0 / np.arange(1, len(others) + 2))  # class j wins a t-way tie with 1/(t+1)
            with_abstentions = np.convolve(tie_share, abstain_ways)[: n + 1]
            wins[v:] += math.comb(size_j, v) * with_abstentions[: n + 1 - v]
    return tuple(float(wins[k] / math.comb(n, k)) for k in range(1, n + 1))


@dataclass
class RunMetrics:
    problems: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    branches: float  # mean per problem
    prompt_tokens: float  # mean per problem
    generated_tokens: float  # mean per problem, every branch counted
    probe_tokens: float  # mean per problem: answer probes of early exit (their text and replies), in no other count
    scored_tokens: float  # mean per problem: tokens fed to read a verdict or a step's score
    drafted_tokens: float  # mean per problem: a draft model's proposals (speculative decoding)
    prompt_computed: float  # mean per problem: prompt tokens evaluated, less those the prefix cache held
    latency_s: float  # mean wall time from a problem's start to its end
    wall_s: float  # run time per problem: elapsed time of the runs / problems (concurrent problems share it)
    tokens_per_s: float  # generated tokens / elapsed time of the runs
    samples: int | None = None  # N of a run of independent samples; None for other strategies
    maj_at_k: list[float] | None = None  # k = 1..samples
    pass_at_k: list[float] | None = None


    @property
    def after_prompt_tokens(self) -> float:
        """Tokens per problem computed after the prompt: generated, scored, probed and drafted."""
        return self.generated_tokens + self.scored_tokens + self.probe_tokens + self.drafted_tokens

    @property
    def computed_tokens(self) -> float:
        """Every token a model computed per problem, both models of a two-model run counted: the prompt tokens it
        evaluated (not those a fork shared or the prefix cache held; a judge's reading of the steps included) and
        the tokens after them. The x of the Pareto plot: a search pays for its judge, an early exit for its probes,
        a cascade for the large model's reading."""
        return self.prompt_computed + self.after_prompt_tokens


def _mean_usage(records: Sequence[dict], counter: str) -> float:
    """The mean of a usage counter per problem; files written before a counter existed count it as 0."""
    return sum(r["usage"].get(counter, 0) for r in records) / len(records)


def summarize(strategy: str, records: Sequence[dict]) -> RunMetrics:
    """Metrics of the problem records of one results file (see ``ponder.bench.runner`` for the record fields)."""
    count = len(records)
    if count == 0:
        raise ValueError("no finished problems to summarize")
    correct = sum(bool(r["correct"]) for r in records)
    generated = sum(r["usage"]["generated_tokens"] for r in records)
    prompt = sum(r["usage"]["prompt_tokens"] for r in records) / count
    elapsed = _elapsed(records)
    metrics = RunMetrics(
        problems=count, correct=correct, accuracy=correct / count, ci95=wilson_interval(correct, count),
        branches=sum(len(r["branches"]) for r in records) / count,
        prompt_tokens=prompt,
        generated_tokens=generated / count,
        probe_tokens=_mean_usage(records, "probe_tokens"),
        scored_tokens=_mean_usage(records, "scored_tokens"),
        drafted_tokens=_mean_usage(records, "drafted_tokens"),
        prompt_computed=prompt - _mean_usage(records, "prompt_tokens_cached"),
        latency_s=sum(r["wall_s"] for r in records) / count,
        wall_s=elapsed / count,
        tokens_per_s=generated / elapsed if elapsed > 0 else 0.0,
    )
    samples = _sample_count(strategy, records)
    if samples:
        metrics.samples = samples
        metrics.maj_at_k = _mean_curve([_maj_curve(r, samples) for r in records])
        metrics.pass_at_k = _mean_curve([_pass_curve(r, samples) for r in records])
    return metrics


def _elapsed(records: Sequence[dict]) -> float:
    """Wall time the runs took: per session (one ``ponder bench`` process), first start to last finish, summed."""
    spans: dict[str, list[float]] = {}
    for r in records:
        span = spans.setdefault(r["session"], [r["started"], r["finished"]])
        span[0], span[1] = min(span[0], r["started"]), max(span[1], r["finished"])
    return sum(end - start for start, end in spans.values())


def _sample_count(strategy: str, records: Sequence[dict]) -> int | None:
    """N when every problem that ran has the same N >= 2 independent samples (a problem that failed before sampling,
    e.g. a prompt too long for the context, has none and counts as wrong at every k). Only a strategy that declares
    its branches independent samples (``Strategy.independent_samples``) has such N."""
    from ..strategies import STRATEGIES  # here, not at the top: the strategies pull in scipy

    declared = STRATEGIES.get(strategy)
    if declared is None or not declared.independent_samples:  # a file of a strategy this ponder no longer has: None
        return None
    counts = {len(r["branches"]) for r in records if "error" not in r}
    if len(counts) != 1:
        return None
    samples = counts.pop()
    return samples if samples >= 2 else None


def _maj_curve(record: dict, samples: int) -> list[float]:
    if "error" in record:
        return [0.0] * samples
    classes = record["answer_classes"]
    abstained = sum(b["answer_class"] is None for b in record["branches"])
    return maj_at_k([c["size"] for c in classes], [c["correct"] for c in classes], abstained)


def _pass_curve(record: dict, samples: int) -> list[float]:
    correct = sum(bool(b["correct"]) for b in record["branches"])
    return [pass_at_k(samples, correct, k) for k in range(1, samples + 1)]


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [float(v) for v in np.mean(np.array(curves), axis=0)]
