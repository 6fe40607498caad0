"""What the step-level searches (beam, dvts, particles, astar) share: a tree of partial solutions on forked branches,
grown one step at a time under a token budget, scored, pruned, and recorded for people to look at.

A ``Node`` is a partial solution: its last step (text up to and including a blank line, see ``ponder.search.steps``),
the branch that holds the prompt and every step of its path, its score (``ponder.search.scorers``) and its value (the
scores of its path aggregated). ``Search.expand`` forks nodes into children and lets every child write one step, all in
one batch: a child shares all of its parent's KV cells (nothing is evaluated again), and the parent's branch is released
as soon as it is forked -- its cells live on in the children. ``Search.score`` scores new nodes; ``Search.prune`` drops
a node and releases its branch at once. A node is

* ``open``     -- it ended a step at the delimiter and may grow;
* ``kept``     -- it was expanded: its children carry it on;
* ``pruned``   -- the search dropped it;
* ``finished`` -- the solution ended: end of generation, a complete ``\\boxed{}``, or a token cap (the step's
  ``step_tokens`` or the solution's ``max_tokens``); a candidate for the final answer;
* ``cut``      -- the budget ran out while it wrote its step (or at ``max_steps``): not a candidate.

The budget counts generated plus scored tokens, of both models. Every round of steps runs under a ``TokenBudget``
whose limit leaves room for scoring each new step (the scorer's ``reserve``), so a run never overshoots; once the
budget halts a step, ``exhausted`` is set and the search answers with what it has.

The final pick (``pick``): ``best`` -- the candidate with the highest value (one that states no answer only when none
does); ``vote`` -- the candidates' answers, each weighted by its value. With no finished candidate, the search's
open and cut nodes are read as solutions cut short (an answer only from a ``\\boxed{}``).

``Result.details["tree"]`` records every node (id, parent, depth, step, tokens, score, value, status, answer) and the
ids of the chosen path; ``ponder.search.drawing`` draws it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

from ..answers import extract_answer, vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams, Usage
from ..prompts import MathPrompt
from ..result import BranchSummary, Result
from ..stopping import TokenBudget
from .scorers import aggregate, check_aggregation, get_scorer
from .steps import extend_step

PICKS = ("best", "vote")


@dataclass(eq=False)  # identity semantics: nodes are keys of the scorer's dicts
class Node:
    id: int
    parent: Node | None
    branch: Branch  # prompt + every step of the path; released once forked, pruned or finished
    step: str = ""  # this node's step, delimiter included ("" for the root: the prompt)
    tokens: int = 0  # tokens sampled for the step
    score: float | None = None
    value: float | None = None  # the scores of the path, aggregated
    status: str = "open"
    summary: BranchSummary | None = None  # a finished solution's record (answer, finish reason, ...)
    depth: int = field(init=False)

    def __post_init__(self):
        self.depth = 0 if self.parent is None else self.parent.depth + 1

    def path(self) -> list[Node]:
        """The nodes from the root to this one."""
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    @property
    def steps(self) -> list[str]:
        return [node.step for node in self.path()[1:]]

    @property
    def answer(self) -> str | None:
        return self.summary.answer if self.summary is not None else None

    def record(self) -> dict:
        rounded = {k: None if v is None else round(v, 4) for k, v in (("score", self.score), ("value", self.value))}
        return {"id": self.id, "parent": None if self.parent is None else self.parent.id, "depth": self.depth,
                "step": self.step, "tokens": self.tokens, **rounded, "status": self.status, "answer": self.answer}


class Search:
    """One search run over one question: ``async with Search(...) as search`` opens the prompt (the root node) and,
    on leaving, releases every branch the search and its scorer still hold."""

    def __init__(self, engine: Engine, question: str, *, params: SamplingParams, seed: int | None,
                 budget: int | None, prompt: MathPrompt, step_tokens: int, max_steps: int, scorer: str, judge: str,
                 aggregate: str, pick: str):
        if step_tokens < 1 or max_steps < 1:
            raise PonderError(f"step_tokens and max_steps must be at least 1, got {step_tokens} and {max_steps}")
        if budget is not None and budget < 1:
            raise PonderError(f"budget must be at least 1 token, got {budget}")
        if pick not in PICKS:
            raise PonderError(f"unknown pick {pick!r}; choose one of: {', '.join(PICKS)}")
        check_aggregation(aggregate)
        self.engine = engine
        self.question = question
        self.prompt = prompt
        self.usage = Usage()
        self.scorer = get_scorer(scorer, engine=engine, usage=self.usage, judge=judge, params=params, seed=seed,
                                 prompt=prompt)
        self.params = replace(params, logprobs=True) if self.scorer.needs_logprobs else params
        self.seed = seed
        self.budget = budget
        self.step_tokens = step_tokens
        self.max_steps = max_steps
        self.aggregation = aggregate
        self.pick = pick
        self.nodes: list[Node] = []
        self.exhausted = False  # the budget ran out
        self._steps_sampled = itertools.count()  # each step samples with its own seed
        self._start = time.perf_counter()

    async def __aenter__(self) -> Search:
        root = await self.engine.open(self.prompt.messages(self.question), self.usage)
        self.root = self._node(None, root)
        return self

    async def __aexit__(self, *exc) -> None:
        for node in self.nodes:
            node.branch.release()
        self.scorer.close()

    def _node(self, parent: Node | None, branch: Branch) -> Node:
        node = Node(len(self.nodes), parent, branch)
        self.nodes.append(node)
        return node

    async def expand(self, plan: Sequence[tuple[Node, int]]) -> list[Node]:
        """Fork each open node of ``plan`` into ``count`` children and let every child write its next step, all at
        once. Returns the children (cut ones included); none when the budget cannot pay for this round."""
        room = self._round_budget(sum(count for _, count in plan))
        if room is None:
            self.exhausted = True
            return []
        children = []
        for parent, count in plan:
            children += [self._node(parent, branch) for branch in await parent.branch.fork(count)]
            parent.branch.release()
            parent.status = "kept"
        for child in children:
            room.reserve(child.branch)
        await asyncio.gather(*(self._write_step(child, room) for child in children))
        return children

    def _round_budget(self, steps: int) -> TokenBudget | None:
        """A budget for ``steps`` steps written at once, leaving room to score each; None when there is not one
        token for each."""
        if self.budget is None:
            return TokenBudget(None, self.usage)
        limit = self.budget - self.usage.scored_tokens - steps * self.scorer.reserve
        if limit - self.usage.generated_tokens < steps:
            return None
        return TokenBudget(limit, self.usage)

    async def _write_step(self, node: Node, room: TokenBudget) -> None:
        branch = node.branch
        cap = min(self.step_tokens, self.params.max_tokens - len(branch.tokens))
        seed = None if self.seed is None else self.seed + next(self._steps_sampled)
        step = await extend_step(branch, replace(self.params, seed=seed), cap=cap,
                                 stop_if=room if room.limit is not None else None)
        room.release(branch)
        node.step, node.tokens = step.text, step.tokens
        if branch.finish_reason == "halted":  # the budget ran out mid-step
            node.status = "cut"
            self.exhausted = True
            branch.release()
        elif step.finished or len(branch.tokens) >= self.params.max_tokens:
            node.status = "finished"
            node.summary = self._summary(node, ended=step.finished)

    def _summary(self, node: Node, *, ended: bool) -> BranchSummary:
        """``node``'s record as a solution; ``ended`` says whether its last step wrote the end, else it was cut short
        (by ``max_tokens``, ``max_steps`` or the budget) and only a ``\\boxed{}`` is read as its answer."""
        summary = BranchSummary.of(node.branch)
        if ended:
            return summary
        cut = "halted" if self.exhausted else "length"
        return replace(summary, finish_reason=cut, answer=extract_answer(node.branch.text, last_number=False))

    async def score(self, nodes: Sequence[Node]) -> None:
        """Score the new nodes that wrote a step (not the cut ones), then release what is no longer needed: the
        scorer's state of their parents, and the branches of finished solutions."""
        scored = [node for node in nodes if node.status in ("open", "finished")]
        scores = await asyncio.gather(*(self.scorer.score(self.question, node) for node in scored))
        for node, score in zip(scored, scores):
            node.score = score
            node.value = aggregate([n.score for n in node.path()[1:]], self.aggregation)
        for parent in {node.parent: None for node in nodes}:
            self.scorer.forget(parent)
        for node in scored:
            if node.status == "finished":
                node.branch.release()
                self.scorer.forget(node)

    def prune(self, node: Node) -> None:
        node.status = "pruned"
        node.branch.release()
        self.scorer.forget(node)

    def cut(self, node: Node) -> None:
        """Stop ``node`` (open) where it is: the search will not grow it (``max_steps``)."""
        node.status = "cut"
        node.branch.release()
        self.scorer.forget(node)

    def result(self, strategy: str, candidates: Sequence[Node]) -> Result:
        """The answer picked among ``candidates`` (finished solutions; repeated ones count once per entry in a vote),
        with every candidate's record, the usage and the tree. Without candidates, the open and cut nodes are read
        as solutions cut short."""
        if not candidates:
            candidates = [node for node in self.nodes if node.status in ("open", "cut") and node.depth > 0]
            for node in candidates:
                node.summary = self._summary(node, ended=False)
        values = [node.value or 0.0 for node in candidates]
        answers = [node.answer for node in candidates]
        answered = [i for i, answer in enumerate(answers) if answer is not None] or range(len(candidates))
        best = max(answered, key=values.__getitem__, default=None)
        if self.pick == "vote":
            ballot = vote(answers, values)
            best = max(ballot.members.get(ballot.winner, []), key=values.__getitem__, default=best)
        else:
            ballot = vote([answers[best]], [values[best]]) if best is not None else vote([])
        chosen = candidates[best] if best is not None else None
        self.usage.wall_s = time.perf_counter() - self._start
        distinct = list(dict.fromkeys(candidates))
        result = Result.from_vote(ballot, [node.summary for node in distinct], self.usage, self.engine.model,
                                  strategy, {})
        result.details = {
            "tree": {"nodes": [node.record() for node in self.nodes],
                     "chosen": [node.id for node in chosen.path()] if chosen is not None else []},
            "scorer": self.scorer.name,
            "scorer_tokens": self.usage.scored_tokens + self.scorer.generated,
            "exhausted": self.exhausted,
        }
        return result

