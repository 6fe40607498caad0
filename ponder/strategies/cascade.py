"""A training-free small-to-large cascade (the vote-based rule of Yue et al.'s MoT cascade, ICLR 2024; a Hybrid LLM
router without the trained router): the small model samples ``k`` answers; when the leading answer holds at least
``tau`` of them, the small model's vote is the answer; otherwise the question escalates to the large model.

The share is the leader's votes over all ``k`` samples, so a sample that states no answer (or was cut off) counts
against agreement, as in MoT. On escalation the large model answers greedily (``m = 1``) or by self-consistency over
``m`` samples; its answer replaces the small model's. The result lists the small model's branches, then the large
model's; ``details`` says whether the question escalated and the small vote's leader and share, and
``usage.models`` holds each model's tokens. The token budget caps the generated tokens of both models together.
``n`` is not used: the sample counts are ``k`` and ``m``.

Options:
  k      samples from the small model (default 4)
  tau    share of the small vote the leading answer needs to be accepted (default 0.75)
  m      on escalation: 1 = the large model's greedy answer (default), more = self-consistency over m samples
  small  the small model (default qwen2.5-0.5b)
  large  the large model (default qwen2.5-1.5b)
  early_exit  end single branches of both models early: ``probe``, ``converge``, ``loop`` or ``probe+loop``, with
         parameters such as ``probe:every=64,window=2`` (see ``ponder.stopping.EarlyExit``; default: off)
"""

from __future__ import annotations

from dataclasses import replace

from ..engine.base import Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..stopping import ballot
from .registry import Strategy
from .two_models import TwoModelRun


async def run(engine: Engine, question: str, *, n: int = 1, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              k: int = 4, tau: float = 0.75, m: int = 1, small: str = "qwen2.5-0.5b", large: str = "qwen2.5-1.5b",
              early_exit: str | None = None) -> Result:
    if k < 1 or m < 1:
        raise PonderError(f"k and m must be at least 1, got k={k}, m={m}")
    if not 0.0 < tau <= 1.0:
        raise PonderError(f"tau must be in (0, 1], got {tau}")
    async with TwoModelRun(engine, question, prompt=prompt) as two:  # one usage: the budget caps both models
        async with two.pool(small, seed=seed, budget=budget, early_exit=early_exit) as pool:
            small_votes = ballot(await pool.sample(params, first=k))
        summaries = [pool.summary(b) for b in pool.branches]  # the small model's branches, then the large one's
        leader = small_votes.winner
        share = small_votes.groups[leader] / k if leader is not None else 0.0
        escalated = share < tau
        deciding = small_votes
        if escalated:
            large_params = replace(params, temperature=0.0) if m == 1 else params
            # Seeds continue after the small model's, so no large sample repeats a small one's random stream.
            large_seed = None if seed is None else seed + k
            async with two.pool(large, seed=large_seed, budget=budget, early_exit=early_exit) as pool:
                deciding = ballot(await pool.sample(large_params, first=m))
            summaries += [pool.summary(b) for b in pool.branches]
        result = two.result("cascade", deciding, summaries)
    result.details = {"escalated": escalated, "small_answer": leader, "small_share": round(share, 4)}
    return result


STRATEGY = Strategy("cascade", run, "the small model samples k answers; below tau agreement the question escalates "
                    "to the large model", "two models")
