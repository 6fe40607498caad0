"""Diverse verifier tree search (DVTS, HF search-and-learn): ``n // m`` independent subtrees, each greedy on the step
scorer.

Each round, the current node of every subtree writes ``m`` candidate next steps (forks of it: they share its KV cells),
all subtrees in one batch. The candidates are scored (``ponder.search.scorers``) and each subtree keeps its single best
child by value; the other children are pruned at once (their KV cells freed), except the ones that finished a solution,
which stay candidates for the answer. A subtree ends when its best child finishes the solution. The search ends when
every subtree has ended, after ``max_steps`` rounds, or when the budget is spent; the answer is picked among the
finished solutions by best value or by a value-weighted vote. Subtrees split the ``n`` samples of a round so that no one
bad first step decides the search, which is why DVTS beats beam search at larger ``n``. The whole tree is in
``details["tree"]`` (``ponder ask --tree FILE`` draws it); see ``ponder/search/tree.py`` for the node states, the budget
and the pick.

Options:
  m            candidates per subtree and round: there are n // m subtrees (default 4)
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


def keep_best(search: Search, siblings: list[Node]) -> Node | None:
    """Prune all open ``siblings`` but the best; return it if it is open (the subtree grows on from it)."""
    scored = [node for node in siblings if node.status in ("open", "finished")]
    best = max(scored, key=lambda node: node.value, default=None)
    for node in scored:
        if node is not best and node.status == "open":
            search.prune(node)
    return best if best is not None and best.status == "open" else None


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              m: int = 4, scorer: str = "judge", judge: str = DEFAULT_JUDGE, aggregate: str = "last",
              pick: str = "best", step_tokens: int = 256, max_steps: int = 40) -> Result:
    if not 1 <= m <= n:
        raise PonderError(f"dvts needs 1 <= m <= n, got m={m}, n={n}")
    async with Search(engine, question, params=params, seed=seed, budget=budget, prompt=prompt,
                      step_tokens=step_tokens, max_steps=max_steps, scorer=scorer, judge=judge, aggregate=aggregate,
                      pick=pick) as search:
        plan, finished = [(search.root, n // m * m)], []  # round 1: each subtree's m first steps fork the prompt
        for _ in range(max_steps):
            children = await search.expand(plan)  # in plan order, m per subtree
            await search.score(children)
            finished += [c for c in children if c.status == "finished"]
            tips = [keep_best(search, children[i:i + m]) for i in range(0, len(children), m)]
            plan = [(tip, m) for tip in tips if tip is not None]
            if not plan or search.exhausted:
                break
        return search.result("dvts", finished)


STRATEGY = Strategy("dvts", run, "diverse verifier tree search: n // m independent subtrees, each keeps its best "
                    "scored step", "search")
