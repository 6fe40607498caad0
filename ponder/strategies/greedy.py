"""Greedy decoding: one branch at temperature 0, the baseline every other strategy is measured against."""

from __future__ import annotations

from dataclasses import replace

from ..engine.base import Engine, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .pool import Pool
from .registry import Strategy

TEMPERATURE = 0.0


async def run(engine: Engine, question: str, *, n: int = 1, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT) -> Result:
    # n and seed are accepted so every strategy shares one signature; greedy always decodes exactly one branch.
    params = replace(params, temperature=TEMPERATURE)
    async with Pool(engine, question, seed=None, budget=budget, prompt=prompt) as pool:
        await pool.sample(params, first=1)
        return pool.result("greedy", {"n": 1, "seed": None, "temperature": TEMPERATURE})


STRATEGY = Strategy("greedy", run, "one branch at temperature 0", "vote", temperature=TEMPERATURE)
