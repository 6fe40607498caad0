"""Self-consistency (Wang et al., 2022): sample N reasoning paths from one prefilled prompt, vote on the answers.

Options:
  weighting  how each answer counts: ``majority`` (default), ``logprob``, ``self-certainty``, ``rpc`` or ``probe``
             (see ``ponder.strategies.weights``).
  early_exit end single branches early: ``probe`` (answer probes), ``converge`` (probes, run-length rule),
             ``loop`` (loop cut) or ``probe+loop``, with parameters such as ``probe:every=64,window=2`` (see
             ``ponder.stopping.EarlyExit``; default: off)
"""

from __future__ import annotations

from ..engine.base import Engine, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .pool import Pool
from .registry import Strategy, sampling_config
from .weights import get_weighting


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              weighting: str = "majority", early_exit: str | None = None) -> Result:
    scheme = get_weighting(weighting)
    params = scheme.sampling(params)
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt, early_exit=early_exit) as pool:
        finished = await pool.sample(params, first=n)
        return pool.result("sc", sampling_config(params), finished, scheme.weigh(finished))


STRATEGY = Strategy("sc", run, "self-consistency: n samples, majority vote (or weighted: logprob, self-certainty, "
                    "rpc, probe)", "vote", independent_samples=True)
