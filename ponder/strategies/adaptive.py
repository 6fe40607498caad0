"""Adaptive-Consistency (Aggarwal et al., 2023): self-consistency that stops sampling once the vote is settled.

Start ``init`` branches; whenever all running branches have finished and the vote is still unsettled, start ``step``
more, up to ``n`` in all (and within the token budget). After every finished branch the stopping rule asks whether
the leading answer stays the leader with probability >= ``threshold``; once it does, the branches still running are
cancelled and the vote is final. With the defaults, four agreeing answers settle the vote after the first wave.

Options:
  init       branches in the first wave (default 4)
  step       branches added per later wave (default 2)
  threshold  probability that the leader stays the leader (default 0.95)
  rule       ``beta`` (the two leading answers, exact; default) or ``dirichlet`` (all answers, Monte Carlo)
  early_exit end single branches early: ``probe`` (answer probes), ``converge`` (probes, run-length rule),
             ``loop`` (loop cut) or ``probe+loop``, with parameters such as ``probe:every=64,window=2`` (see
             ``ponder.stopping.EarlyExit``; default: off)
"""

from __future__ import annotations

from ..engine.base import Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..stopping import LeaderStable
from .pool import Pool
from .registry import Strategy


async def run(engine: Engine, question: str, *, n: int = 16, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              init: int = 4, step: int = 2, threshold: float = 0.95, rule: str = "beta",
              early_exit: str | None = None) -> Result:
    if step < 1:
        raise PonderError(f"step must be at least 1, got {step}")
    settled = LeaderStable(threshold, rule)
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt, early_exit=early_exit) as pool:
        await pool.sample(params, first=min(init, n), then=step, limit=n, until=settled)
        return pool.result("adaptive")


STRATEGY = Strategy("adaptive", run, "Adaptive-Consistency: add samples only while the vote is unsettled "
                    "(Beta/Dirichlet rule)", "vote")
