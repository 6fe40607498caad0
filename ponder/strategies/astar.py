"""A*-decoding (Chatziveroglou 2025): best-first search over reasoning steps, guided by a step scorer.

The open set holds partial solutions ordered by f = g + h, where h = 1 - value (the value of the path from
``ponder.search.scorers``: how likely it is to be right) and g = ``step_cost`` x depth, the cost of the steps taken so
far. The paper's exact g could not be read (its code was not available); this one is the plain A* path cost with one
unit per step: it breaks near-ties in favour of shorter paths and, the larger ``step_cost``, the more readily the search
goes back to a shallower alternative. ``step_cost=0`` makes it greedy best-first on the value.

The search pops the node with the lowest f (ties: the earlier node). A complete solution popped ends the search: it is
the answer. Any other node is expanded: ``n`` next steps are sampled on forks of it (they share all of its KV cells,
and its own branch is released), scored, and pushed. A node at ``max_steps`` is cut instead of expanded. The open set
keeps at most ``frontier`` nodes -- each holds a branch (a sequence and KV cells of the engine) -- and prunes the
worst beyond that at once. When the budget is spent first, the answer is the best complete solution still in the open
set, if any. The order of the pops is in ``details["popped"]``, the whole tree in ``details["tree"]`` (``ponder ask
--tree FILE`` draws it); see ``ponder/search/tree.py`` for the node states and the budget.

``n`` is the expansion width k (default 4).

Options:
  step_cost    g per step taken (default 0.01)
  frontier     nodes the open set holds at most (default 16)
  scorer       judge (default), probe or logprob (see ponder/search/scorers.py)
  judge        the judge model for scorer=judge (default qwen2.5-1.5b; the generating model judges its own steps)
  aggregate    a path's value from its steps' scores: last (default), min or prod
  step_tokens  tokens per step at most (default 256)
  max_steps    depth at most (default 40)
"""

from __future__ import annotations

import heapq

from ..engine.base import Engine, PonderError, SamplingParams
from ..verifiers.judging import DEFAULT_JUDGE
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .registry import Strategy
from ..search.tree import Node, Search


async def run(engine: Engine, question: str, *, n: int = 4, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              step_cost: float = 0.01, frontier: int = 16, scorer: str = "judge", judge: str = DEFAULT_JUDGE,
              aggregate: str = "last", step_tokens: int = 256, max_steps: int = 40) -> Result:
    if step_cost < 0:
        raise PonderError(f"step_cost must be at least 0, got {step_cost}")
    if frontier < n:
        raise PonderError(f"frontier must hold at least the n={n} children of one expansion, got {frontier}")

    def f(node: Node) -> float:
        return step_cost * node.depth + 1 - node.value

    async with Search(engine, question, params=params, seed=seed, budget=budget, prompt=prompt,
                      step_tokens=step_tokens, max_steps=max_steps, scorer=scorer, judge=judge, aggregate=aggregate,
                      pick="best") as search:
        open_set: list[tuple[float, int, Node]] = []  # a heap of (f, id, node): ties go to the earlier node
        popped, solution, node = [], None, search.root
        while True:
            if node.depth >= max_steps:
                search.cut(node)
            else:
                children = await search.expand([(node, n)])
                await search.score(children)
                for child in children:
                    if child.status in ("open", "finished"):
                        heapq.heappush(open_set, (f(child), child.id, child))
                for *_, worst in sorted(open_set)[frontier:]:
                    search.prune(worst)
                open_set = [entry for entry in open_set if entry[2].status != "pruned"]
                heapq.heapify(open_set)
            if search.exhausted or not open_set:
                break
            _, _, node = heapq.heappop(open_set)
            popped.append(node.id)
            if node.status == "finished":
                solution = node
                break
        if solution is not None:
            candidates = [solution]
        else:  # the budget ran out first: the best complete solution in the open set, if any
            candidates = [entry[2] for entry in sorted(open_set) if entry[2].status == "finished"][:1]
        result = search.result("astar", candidates)
        result.details["popped"] = popped
        return result


STRATEGY = Strategy("astar", run, "A*-decoding: best-first over partial solutions by step cost + (1 - score), n "
                    "steps per expansion", "search")
