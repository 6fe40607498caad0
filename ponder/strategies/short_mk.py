"""short-m@k (Hassid et al., 2025, "Don't Overthink It"): run k = ``n`` branches at once, stop as soon as ``m`` have
finished, cancel the others, and vote among the m. On a batched engine the first to finish are the shortest, and
shorter reasoning chains are more often right; ties go to the answer that finished first. ``first-finish`` is
short-1@k: the answer of the branch that finishes first.

Options (short-m@k):
  m  branches to wait for (default 3)
"""

from __future__ import annotations

from ..engine.base import Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..stopping import FirstM
from .pool import Pool
from .registry import Strategy


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              m: int = 3) -> Result:
    return await _first_m(engine, question, n=n, params=params, seed=seed, budget=budget, prompt=prompt, m=m,
                          name="short-m@k")


async def first_finish(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
                       seed: int | None = None, budget: int | None = None,
                       prompt: MathPrompt = DEFAULT_PROMPT) -> Result:
    return await _first_m(engine, question, n=n, params=params, seed=seed, budget=budget, prompt=prompt, m=1,
                          name="first-finish")


STRATEGY = Strategy("short-m@k", run, "run n branches, stop when m have finished, vote among those m", "vote")
FIRST_FINISH = Strategy("first-finish", first_finish, "run n branches, answer with the first to finish (short-1@k)",
                        "vote")


async def _first_m(engine: Engine, question: str, *, n: int, params: SamplingParams, seed: int | None,
                   budget: int | None, prompt: MathPrompt, m: int, name: str) -> Result:
    enough = FirstM(m)
    if m > n:
        raise PonderError(f"{name} waits for m={m} of n={n} branches; m must not exceed n")
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt) as pool:
        finished = await pool.sample(params, first=n, until=enough)
        return pool.result(name, {"m": m}, finished[:m])  # first-finish's m is its own, not an option
