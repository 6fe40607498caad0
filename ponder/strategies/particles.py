"""Particle filtering over reasoning steps (Puri et al. 2025, "Rollout Roulette"): ``n`` particles each write one step,
are weighted by their scores, and are resampled, every step.

Each round, every unfinished particle writes its next step; a node resampled ``c`` times writes ``c`` different next
steps, each on a fork of its branch (so the copies share all of its KV cells). The new steps are scored
(``ponder.search.scorers``), and every particle of the pool -- finished ones stay in it with their final value -- gets
the weight softmax(logit(value) / weight_temperature) (that is, proportional to (value / (1 - value)) ** (1 / T)). Then
``n`` particles are drawn from the pool with replacement (multinomial resampling, numpy's Generator seeded with
``seed``): a node drawn ``c`` times is carried ``c`` times, a node drawn none is pruned and its KV cells freed at once.
The search ends when every particle has finished, after ``max_steps`` rounds, or when the budget is spent. The answer is
picked among the finished particles of the final pool, by best value or by a value-weighted vote (a particle carried
several times votes as often). The whole tree is in ``details["tree"]`` (``ponder ask --tree FILE`` draws it); see
``ponder/search/tree.py`` for the node states, the budget and the pick.

Options:
  weight_temperature  T of the resampling weights (default 1, the paper's)
  scorer              judge (default), probe or logprob (see ponder/search/scorers.py)
  judge               the judge model for scorer=judge (default qwen2.5-1.5b; the generating model judges itself)
  aggregate           a path's value from its steps' scores: last (default, the paper's), min or prod
  pick                the final answer: best (highest value, default) or vote (value-weighted)
  step_tokens         tokens per step at most (default 256)
  max_steps           rounds at most (default 40)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.special import logit, softmax

from ..engine.base import Engine, PonderError, SamplingParams
from ..verifiers.judging import DEFAULT_JUDGE
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .registry import Strategy
from ..search.tree import Node, Search

CERTAIN = 1e-6  # values are clipped to [CERTAIN, 1 - CERTAIN] so that logit stays finite


def weights(values: list[float], temperature: float) -> np.ndarray:
    """Resampling weights: softmax(logit(value) / temperature)."""
    return softmax(logit(np.clip(values, CERTAIN, 1 - CERTAIN)) / temperature)


def resample(pool: list[Node], n: int, temperature: float, rng: np.random.Generator) -> list[Node]:
    """``n`` particles drawn from ``pool`` with replacement, in proportion to their weights (pool order kept)."""
    counts = rng.multinomial(n, weights([node.value for node in pool], temperature))
    return [node for node, count in zip(pool, counts) for _ in range(count)]


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              weight_temperature: float = 1.0, scorer: str = "judge", judge: str = DEFAULT_JUDGE,
              aggregate: str = "last", pick: str = "best", step_tokens: int = 256, max_steps: int = 40) -> Result:
    if not weight_temperature > 0:
        raise PonderError(f"weight_temperature must be above 0, got {weight_temperature}")
    rng = np.random.default_rng(seed)
    async with Search(engine, question, params=params, seed=seed, budget=budget, prompt=prompt,
                      step_tokens=step_tokens, max_steps=max_steps, scorer=scorer, judge=judge, aggregate=aggregate,
                      pick=pick) as search:
        pool = [search.root] * n
        for _ in range(max_steps):
            growing = Counter(node for node in pool if node.status == "open")
            children = await search.expand(list(growing.items()))
            await search.score(children)
            pool = [node for node in pool if node.status == "finished"] + [c for c in children if c.status != "cut"]
            if search.exhausted:
                break
            survivors = resample(pool, n, weight_temperature, rng)
            for node in dict.fromkeys(pool):
                if node not in survivors:
                    search.prune(node)  # drawn out of the pool: its cells are freed (a finished one's already were)
            pool = survivors
            if all(node.status == "finished" for node in pool):
                break
        return search.result("particles", [node for node in pool if node.status == "finished"])


STRATEGY = Strategy("particles", run, "particle filtering: n partial solutions, resampled by their step "
                    "scores after every step", "search")
