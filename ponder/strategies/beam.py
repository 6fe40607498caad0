"""Beam search over reasoning steps, scored by a step scorer (HF search-and-learn's PRM beam search).

Each round, the ``n // m`` kept beams write ``n`` candidate next steps between them (``m`` each when all are kept; as in
search-and-learn, the beams left share out all ``n`` when some have finished): every candidate is a fork of its beam, so
it shares all of the beam's KV cells. The candidates are scored (``ponder.search.scorers``); the ones that finish a
solution are collected, and of the others the ``n // m`` with the highest value are kept, the rest pruned at once (their
KV cells freed). The search ends when ``n`` solutions have finished, no beam is left, after ``max_steps`` rounds, or
when the budget is spent; the answer is picked among the finished solutions by best value or by a value-weighted vote.
The whole tree is in ``details["tree"]`` (``ponder ask --tree FILE`` draws it); see ``ponder/search/tree.py`` for the
node states, the budget and the pick.

Options:
  m            candidates per beam: n // m beams are kept each round (default 4)
  scorer       judge (default), probe or logprob (see ponder/search/scorers.py)
  judge        the judge model for scorer=judge (default qwen2.5-1.5b; the generating model judges its own steps)
  aggregate    a path's value from its steps' scores: last (default), min or prod
  pick         the final answer: best (highest value, default) or vote (value-weighted)
  step_tokens  tokens per step at most (default 256)
  max_steps    rounds at most (default 40)
"""

from __future__ import annotations

from ..engine.base import Engine, PonderError, SamplingParams
from ..verifiers.judging import DEFAULT_JUDGE
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .registry import Strategy
from ..search.tree import Node, Search


def share_out(beams: list[Node], n: int) -> list[tuple[Node, int]]:
    """``n`` candidates spread over ``beams`` (best first) as evenly as they go."""
    return [(beam, n // len(beams) + (i < n % len(beams))) for i, beam in enumerate(beams)]


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              m: int = 4, scorer: str = "judge", judge: str = DEFAULT_JUDGE, aggregate: str = "last",
              pick: str = "best", step_tokens: int = 256, max_steps: int = 40) -> Result:
    if not 1 <= m <= n:
        raise PonderError(f"beam needs 1 <= m <= n, got m={m}, n={n}")
    width = n // m
    async with Search(engine, question, params=params, seed=seed, budget=budget, prompt=prompt,
                      step_tokens=step_tokens, max_steps=max_steps, scorer=scorer, judge=judge, aggregate=aggregate,
                      pick=pick) as search:
        beams, finished = [search.root], []
        for _ in range(max_steps):
            candidates = await search.expand(share_out(beams, n))
            await search.score(candidates)
            finished += [c for c in candidates if c.status == "finished"]
            ranked = sorted((c for c in candidates if c.status == "open"), key=lambda c: c.value, reverse=True)
            beams = ranked[:width]
            for loser in ranked[width:]:
                search.prune(loser)
            if len(finished) >= n or not beams or search.exhausted:
                break
        return search.result("beam", finished)


STRATEGY = Strategy("beam", run, "beam search over steps: n // m beams, m scored candidate steps each, the best "
                    "kept", "search")
