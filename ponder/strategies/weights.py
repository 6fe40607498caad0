"""Vote weightings for self-consistency: how much each finished branch's answer counts.

* ``majority`` -- one vote each (Wang et al., 2022).
* ``logprob`` -- the branch's geometric-mean token probability, ``exp(mean token logprob)``.
* ``self-certainty`` -- the branch's mean token confidence (-mean of the top-k logprobs at each step), DeepConf's
  "average trace confidence", its top-k form of self-certainty (Kang et al., 2025).
* ``rpc`` -- Reasoning-pruning Perplexity Consistency (Zhou et al., 2025): each distinct reasoning path counts with
  its probability ``exp(mean token logprob)``; identical paths count once; paths that a two-component Weibull mixture
  fitted to the probabilities assigns to the low component, and that are below the mean, are pruned.
* ``probe`` -- the model's correctness probe on the branch's final hidden state (``ponder.probes``), P(right): the
  branches sample with ``hidden=True`` and the vector their last decode computed is read, at no cost. A branch that
  kept none counts 0.5 (no evidence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize

from ..engine.base import Branch, PonderError, SamplingParams

CONFIDENCE_TOP_K = 20  # logprobs per step behind a token confidence (DeepConf uses 20)


@dataclass(frozen=True)
class Weighting:
    weigh: Callable[[Sequence[Branch]], list[float]]
    logprobs: bool = False  # the weighting reads branch.token_logprobs
    confidences: bool = False  # the weighting reads branch.confidences
    hidden: bool = False  # the weighting reads branch.hidden_state

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the per-token signals this weighting reads switched on."""
        return replace(params, logprobs=params.logprobs or self.logprobs,
                       top_logprobs=max(params.top_logprobs, CONFIDENCE_TOP_K if self.confidences else 0),
                       hidden=params.hidden or self.hidden)


def _path_probability(branch: Branch) -> float:
    return math.exp(branch.mean_logprob) if branch.mean_logprob is not None else 0.0


def _low_component(probabilities: np.ndarray) -> np.ndarray:
    """RPC's reasoning pruning: True for paths that a two-component Weibull mixture puts in its low-mean component
    (fitted by maximum likelihood from RPC's starting point) and that are below the mean probability."""
    x = np.clip(probabilities, 1e-12, None)

    def weibull(k, scale):
        return (k / scale) * (x / scale) ** (k - 1) * np.exp(-((x / scale) ** k))

    def mixture(params):
        w, k1, l1, k2, l2 = params
        return w * weibull(k1, l1), (1 - w) * weibull(k2, l2)

    def nll(params):
        a, b = mixture(params)
        value = -np.sum(np.log(a + b + 1e-300))
        return value if np.isfinite(value) else 1e300  # the optimiser probes shapes where the pdf overflows

    with np.errstate(all="ignore"):
        fit = minimize(nll, [0.5, 1.0, 1.0, 1.5, 2.0], bounds=[(0.2, 0.8)] + [(0.01, None)] * 4)
        first, second = mixture(fit.x)
    w, k1, l1, k2, l2 = fit.x
    first_is_high = l1 * math.gamma(1 + 1 / k1) >= l2 * math.gamma(1 + 1 / k2)  # the Weibull means
    high, low = (first, second) if first_is_high else (second, first)
    return (low > high) & (x < x.mean())


# Fewer paths than this cannot support a two-component fit: RPC then only merges identical paths.
RPC_MIN_PATHS = 4


def rpc(branches: Sequence[Branch]) -> list[float]:
    probabilities = np.array([_path_probability(b) for b in branches])
    pruned = _low_component(probabilities) if len(branches) >= RPC_MIN_PATHS else np.zeros(len(branches), bool)
    weights, seen = [], set()
    for branch, p, prune in zip(branches, probabilities, pruned):
        weights.append(0.0 if prune or branch.text in seen else float(p))
        seen.add(branch.text)
    return weights


NO_PROBE_EVIDENCE = 0.5


def probe_weights(branches: Sequence[Branch]) -> list[float]:
    from ..probes import kept_score

    scores = [kept_score(b) for b in branches]
    return [NO_PROBE_EVIDENCE if s is None else s for s in scores]


WEIGHTINGS = {
    "majority": Weighting(lambda branches: [1.0] * len(branches)),
    "logprob": Weighting(lambda branches: [_path_probability(b) for b in branches], logprobs=True),
    "self-certainty": Weighting(lambda branches: [b.mean_confidence or 0.0 for b in branches], confidences=True),
    "rpc": Weighting(rpc, logprobs=True),
    "probe": Weighting(probe_weights, hidden=True),
}


def get_weighting(name: str) -> Weighting:
    try:
        return WEIGHTINGS[name]
    except KeyError:
        raise PonderError(f"unknown weighting {name!r}; choose one of: {', '.join(WEIGHTINGS)}") from None
