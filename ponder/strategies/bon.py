"""Best-of-N: sample ``n`` candidate solutions, score each with a verifier, answer with the best-scored one.

A candidate that states no answer is chosen only when none does. Ties in score go to the candidate whose answer more
candidates share, then to the one that finished first. The candidates' KV cells stay alive until they are scored, so
the ``self`` verifier reuses them. Verifier tokens are in the result's usage (``scored_tokens``; a judge's prompts
also in ``prompt_tokens``; on a remote server that cannot score, the question as ``prompt_tokens`` and the one-token
verdict as ``generated_tokens``); the token budget caps generation.

Options:
  verifier  ``self`` (default), ``judge``, ``program`` or ``probe`` (see ``ponder.verifiers``); ``probe`` samples
            with ``hidden=True`` so that reading each candidate's final hidden state costs nothing
  judge     the judge model for ``verifier=judge``: a bundled model name or a GGUF path (default qwen2.5-1.5b);
            the name of the generating model reuses its engine
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from ..engine.base import Engine, SamplingParams
from ..verifiers.judging import DEFAULT_JUDGE
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..stopping import ballot
from ..verifiers import get_verifier
from .pool import Pool
from .registry import Strategy


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              verifier: str = "self", judge: str = DEFAULT_JUDGE) -> Result:
    check = get_verifier(verifier, engine=engine, judge=judge)
    if getattr(check, "wants_hidden", False):
        params = replace(params, hidden=True)
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt) as pool:
        candidates = await pool.sample(params, first=n, keep=True)
        if not candidates:  # the budget ran out before any candidate finished
            return pool.result("bon")
        scores = await asyncio.gather(*(check.score(question, c) for c in candidates))
        # support = how many candidates share i's answer; 0 for a candidate without one, which can win only alone
        support = {i: len(group) for group in ballot(candidates).members.values() for i in group}
        best = max(range(len(candidates)), key=lambda i: (i in support, scores[i], support.get(i, 0), -i))
        return pool.result("bon", {}, [candidates[best]], [scores[best]])


STRATEGY = Strategy("bon", run, "best-of-n: the candidate a verifier (self, judge, program or probe) scores "
                    "highest", "verify")
