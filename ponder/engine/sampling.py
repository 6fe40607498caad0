"""Per-row token sampling over a logits matrix, in numpy.

The vocabulary has 151,936 entries, and a full sort or ``argpartition`` of a row costs about 3 ms: at 16 branches that
would be half the decode step. So every operation first keeps only the *candidates*, the tokens whose logit is within
a few nats of the row's maximum (one vectorised compare), and works on that short list. What is dropped is negligible
by construction:

* sampling at temperature T keeps logits above ``max - SAMPLE_NATS * T``: a dropped token had probability below
  ``exp(-SAMPLE_NATS)`` relative to the best one;
* log-probabilities normalise over logits above ``max - LOGPROB_NATS``: all the dropped tokens together carry less than
  ``V * exp(-LOGPROB_NATS)`` (about 1e-8) of the mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SamplingParams
from .tokens import top_k_confidence, top_k_entropy

SAMPLE_NATS = 20.0
LOGPROB_NATS = 30.0


@dataclass
class Sample:
    token: int
    logprob: float | None = None  # log p(token) under the model's own (untempered) distribution
    confidence: float | None = None  # -mean of the top-k log-probabilities (DeepConf token confidence)
    entropy: float | None = None  # entropy of the model's distribution, in nats


def distribution(row: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution ``params`` samples from, as (candidate token ids, probabilities summing to 1).

    Greedy (temperature 0) is a single candidate with probability 1. Speculative decoding compares the target's and
    the draft's distributions in exactly this form."""
    top = float(row.max())
    if params.temperature <= 0.0:
        return np.array([int(row.argmax())]), np.array([1.0])
    t = params.temperature
    cand = np.flatnonzero(row > top - SAMPLE_NATS * t)
    vals = row[cand]
    if params.top_k and cand.size > params.top_k:
        keep = np.argpartition(vals, -params.top_k)[-params.top_k :]
        cand, vals = cand[keep], vals[keep]
    probs = np.exp((vals - top) / t)  # the best token has weight exactly 1
    if params.min_p > 0.0:
        keep = probs >= params.min_p
        cand, probs = cand[keep], probs[keep]
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1
        cand, probs = cand[order[:n_keep]], probs[order[:n_keep]]
    return cand, probs / probs.sum()


def draw(cand: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a (candidates, probabilities) distribution."""
    cum = np.cumsum(probs)
    return int(cand[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), cand.size - 1)])


def sample(row: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> Sample:
    """Pick the next token from one row of logits according to ``params``."""
    if params.temperature <= 0.0:
        token = int(row.argmax())  # no random draw: greedy leaves the branch's generator untouched
    else:
        token = draw(*distribution(row, params), rng)
    return describe(row, token, params)


def describe(row: np.ndarray, token: int, params: SamplingParams) -> Sample:
    """``token`` with the log-probability, confidence and entropy that ``params`` asks to record."""
    if not params.wants_logprobs:
        return Sample(token)
    return _with_logprobs(row, float(row.max()), token, params.top_logprobs)


def speculative_choice(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray], drafted: int,
                       rng: np.random.Generator) -> int | None:
    """Modified rejection sampling (Leviathan et al., 2023; Chen et al., 2023): accept the draft's token ``drafted``
    (drawn from ``q``) with probability min(1, p(x) / q(x)); None means accepted, else the returned token replaces it,
    drawn from the residual max(0, p - q), renormalised. Together the output has exactly the target's distribution
    ``p``. Greedy targets (one candidate) accept exactly their own argmax and otherwise return it."""
    p_cand, p_probs = p
    if p_cand.size == 1:  # greedy: deterministic, no random draw
        return None if drafted == int(p_cand[0]) else int(p_cand[0])
    p_of = dict(zip(p_cand.tolist(), p_probs.tolist()))
    q_of = dict(zip(q[0].tolist(), q[1].tolist()))
    px, qx = p_of.get(drafted, 0.0), q_of.get(drafted, 0.0)
    if qx > 0.0 and rng.random() * qx < px:  # u < p/q without dividing
        return None
    residual = np.array([max(0.0, pp - q_of.get(tok, 0.0)) for tok, pp in p_of.items()])
    if residual.sum() <= 0.0:  # p == q up to rounding: any draw from p is exact
        return draw(p_cand, p_probs, rng)
    return draw(p_cand, residual / residual.sum(), rng)


def _log_normalizer(row: np.ndarray, top: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Candidate logits (shifted by the max), their weights exp(shifted), and log of the summed weights."""
    shifted = row[row > top - LOGPROB_NATS].astype(np.float64) - top
    weights = np.exp(shifted)
    return shifted, weights, float(np.log(weights.sum()))


def token_logprob(row: np.ndarray, token: int) -> float:
    """log p(token) under the row's distribution."""
    top = float(row.max())
    return float(row[token]) - top - _log_normalizer(row, top)[2]


def _with_logprobs(row: np.ndarray, top: float, token: int, top_k: int) -> Sample:
    shifted, weights, log_total = _log_normalizer(row, top)
    lse = top + log_total
    logprob = float(row[token]) - lse
    if top_k == 0:
        return Sample(token, logprob)
    if shifted.size >= top_k:
        best = np.partition(shifted, -top_k)[-top_k:] + top
    else:  # a very peaked row: fewer than k tokens within LOGPROB_NATS of the best, so look at the whole row
        best = np.partition(row, -top_k)[-top_k:].astype(np.float64)
    best_logprobs = best - lse
    return Sample(token, logprob, top_k_confidence(best_logprobs), top_k_entropy(best_logprobs))
