"""DeepConf, Deep Think with Confidence (Fu et al., 2025): vote only with the traces the model was confident in.

A token's confidence is the negative mean of the top-k logprobs at its step; a group confidence is the mean over a
sliding window of ``window`` tokens; a trace's confidence is its lowest group confidence (or, offline, optionally its
``tail``: the mean over its last ``window`` tokens). Votes are weighted by trace confidence.

* ``offline``: sample ``n`` traces, keep the ``keep`` % most confident, vote.
* ``online`` (default): ``warmup`` traces run to the end; the threshold is the ``100 - keep`` percentile of their
  confidences. Later traces start ``step`` at a time and each is cancelled mid-decode as soon as its window confidence
  drops below the threshold; no more start once the leading answer holds ``consensus`` of the weighted vote, or at
  ``n`` traces. Traces below the threshold (warm-up ones included) do not vote.

Options:
  mode       ``online`` (default) or ``offline``
  keep       percent of traces kept: 90 is DeepConf-high (default), 10 is DeepConf-low
  window     tokens per confidence group (default 32; the paper's 2048 is for traces of ~10k tokens)
  warmup     online: traces that set the threshold (default 4)
  step       online: traces started per later wave (default 2)
  consensus  online: weighted vote share of the leader that stops sampling (default 0.95)
  metric     offline: ``lowest-group`` (default) or ``tail``
  early_exit end single branches early: ``probe`` (answer probes), ``converge`` (probes, run-length rule),
             ``loop`` (loop cut) or ``probe+loop``, with parameters such as ``probe:every=64,window=2`` (see
             ``ponder.stopping.EarlyExit``; default: off)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..engine.base import Branch, Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..stopping import ConfidenceFloor, MajorityShare, group_confidences
from .pool import Pool
from .registry import Strategy, sampling_config
from .weights import CONFIDENCE_TOP_K

METRICS = ("lowest-group", "tail")
MODES = ("online", "offline")


def trace_confidence(branch: Branch, window: int, metric: str = "lowest-group") -> float:
    if not branch.confidences:
        return 0.0
    if metric == "tail":
        return float(np.mean(branch.confidences[-window:]))
    return min(group_confidences(branch.confidences, window))


async def run(engine: Engine, question: str, *, n: int = 16, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              mode: str = "online", keep: float = 90.0, window: int = 32, warmup: int = 4, step: int = 2,
              consensus: float = 0.95, metric: str = "lowest-group", early_exit: str | None = None) -> Result:
    if mode not in MODES:
        raise PonderError(f"unknown deepconf mode {mode!r}; choose one of: {', '.join(MODES)}")
    if metric not in METRICS:
        raise PonderError(f"unknown confidence metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if not 0 < keep <= 100:
        raise PonderError(f"keep must be a percentage in (0, 100], got {keep}")
    if window < 1 or step < 1:
        raise PonderError(f"window and step must be at least 1, got window={window}, step={step}")
    params = replace(params, top_logprobs=max(params.top_logprobs, CONFIDENCE_TOP_K))  # fills branch.confidences
    config = sampling_config(params)
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt, early_exit=early_exit) as pool:
        if mode == "offline":
            traces = await pool.sample(params, first=n)
            confidence = {b: trace_confidence(b, window, metric) for b in traces}
            kept = sorted(traces, key=confidence.__getitem__, reverse=True)[:math.ceil(len(traces) * keep / 100)]
            voters = [b for b in traces if b in kept]  # back in finishing order, so ties go to the first finished
            return pool.result("deepconf", config, voters, [confidence[b] for b in voters])

        warm = await pool.sample(params, first=min(warmup, n))
        floor = float(np.percentile([trace_confidence(b, window) for b in warm], 100 - keep)) if warm else 0.0

        def weigh(branch: Branch) -> float:
            confidence = trace_confidence(branch, window)
            return confidence if confidence >= floor else 0.0

        settled = MajorityShare(consensus, weigh)
        if n > warmup and not settled(pool.finished):
            await pool.sample(params, first=step, then=step, limit=n - warmup,
                              stop_if=ConfidenceFloor(floor, window), until=settled)
        voters = [b for b in pool.finished if weigh(b) > 0]
        config["threshold"] = round(floor, 4)
        return pool.result("deepconf", config, voters, [weigh(b) for b in voters])


STRATEGY = Strategy("deepconf", run, "DeepConf: confidence-filtered weighted vote; online mode cancels "
                    "low-confidence branches mid-decode", "vote")
