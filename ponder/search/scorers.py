"""Step scorers: the value in [0, 1] of a partial solution, which step-level search (beam, DVTS, particles, A*) ranks.

A scorer reads a *partial solution*: a node of the search (``Partial``) that holds the generating model's branch
(prompt plus every step so far, its KV cells live), the text of each step, and how many tokens its last step
sampled. ``await scorer.score(question, partial)`` returns the value; a search calls ``scorer.forget(partial)`` once
it no longer needs what the scorer keeps for that node (its children are scored, or it was pruned), and
``scorer.close()`` at the end of the run. No process reward model (PRM) is installable here, so three scorers stand
in for one:

* ``judge`` -- a model (default the large one, qwen2.5-1.5b) reads the question and the steps so far as its own
  conversation and is asked whether they are correct and on track; the value is P(Yes) / (P(Yes) + P(No)) from one
  forward pass (two one-token ``score`` calls on the same fork; on a server that cannot ``score``, such as
  llama-cpp-python's, from the alternatives of the reply's first token, generated greedily). The question is
  evaluated once per problem on the judge; the judge keeps a branch per live node, holding the prompt and that node's
  steps, and a child's is a fork of its parent's with the child's step appended: every step is read once by the
  judge, however deep the tree.
  When the judge is the generating model itself, it reads the node's own branch and keeps nothing.
* ``probe`` -- rollout-free: ``PROBES`` forks of the partial solution are told "The final answer is \\boxed{" and
  sample at most ``PROBE_TOKENS`` tokens until the box closes; the value is the share of the probes that agree on an
  answer (a probe without an answer counts against). The forks are released at once. Probes sample with the
  search's temperature: at 0 they all agree.
* ``logprob`` -- free: exp of the mean token log-probability of the last step (its geometric-mean token
  probability). The search samples with ``logprobs=True`` for it.
* ``hidden`` -- the generating model's correctness probe (``ponder.probes``) on the final hidden state after the
  last step: one token evaluated per node (the step's last token, not yet in the KV cells), no sampling. The probe
  was trained on finished solutions; on partial ones it reads how the solution is going so far.

A value is the score of the partial solution as of its last step; ``aggregate`` turns the scores of every step of a
path into the node's value: ``last`` (the last step's, as in search-and-learn's default and particle filtering),
``min`` or ``prod``.

Every token a scorer spends is counted in the run's ``Usage``, per model: the judge's prompt, steps and question as
``prompt_tokens`` and its two replies as ``scored_tokens``; probes' forced text as ``prompt_tokens`` and their
answers as ``generated_tokens`` (also kept in ``scorer.generated``). ``reserve`` is the most a ``score`` call adds
to generated plus scored tokens, which a search keeps free in its budget before it samples the steps to score.

A PRM served behind an OpenAI-compatible endpoint (e.g. Qwen2.5-Math-PRM-7B on vLLM's ``/pooling`` API) plugs in as
one more ``Scorer``: ``score`` posts the question and ``partial.steps`` (joined with the PRM's step separator) and
returns the last step's reward, counting the input tokens the server reports with ``usage.add("scored_tokens", n,
prm_name)``; its ``reserve`` is the longest input it may send (the question plus ``max_tokens``), and it keeps
nothing to forget. ``get_scorer`` then takes its name and endpoint.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Protocol, Sequence

from ..answers import extract_answer, vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams, Usage
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..verifiers.judging import DEFAULT_JUDGE, judge_turn, reply_p_yes
from .steps import states_answer

SCORERS = ("judge", "probe", "logprob", "hidden")

JUDGE_QUESTION = ("Are the reasoning steps so far correct, and are they on track to solve the problem? Reply with "
                  "Yes or No only.")
# Closes the assistant's turn (the steps), asks as the user, and opens the reply; the reply's first token is "Yes" or
# "No" (no leading space after the turn's newline).
JUDGE_TURN = judge_turn(JUDGE_QUESTION)
JUDGE_REPLY_TOKENS = 2  # "Yes" and "No": one token each in the Qwen2.5 vocabulary
# Judge calls in flight per run. Each holds two of the judge model's sequences (the question's fork, the score's
# own), besides one per live node: bounded, two problems of a 16-wide search still fit the engine's 64 sequences.
JUDGE_CONCURRENCY = 4

PROBE = "The final answer is \\boxed{"
PROBES = 4  # probes per partial solution
PROBE_TOKENS = 16  # tokens per probe at most: an answer, not a derivation
PROBE_SEEDS = 1 << 32  # probe i samples with seed + PROBE_SEEDS + i: apart from the search's steps (seed + j)

NO_STEP_TOKENS = 0.5  # the logprob value of a step that sampled no token (the model ended at once): no evidence


class Partial(Protocol):
    """What a scorer reads of a search node."""

    parent: Partial | None
    branch: Branch  # the generating model's branch: prompt + every step of the path
    step: str  # the last step's text, delimiter included
    tokens: int  # tokens sampled for the last step

    @property
    def steps(self) -> list[str]: ...  # every step of the path, in order


class Scorer(ABC):
    """The value of partial solutions of one problem, for one search run."""

    name = ""
    reserve = 0  # tokens (generated + scored) one ``score`` call may add at most
    needs_logprobs = False  # the search must sample with ``logprobs=True``

    def __init__(self):
        self.generated = 0  # tokens this scorer had the engine generate (probes)

    @abstractmethod
    async def score(self, question: str, partial: Partial) -> float:
        """The value of ``partial`` in [0, 1]."""

    def forget(self, partial: Partial) -> None:
        """Free what this scorer keeps for ``partial``: the search will not score its children (any more)."""

    def close(self) -> None:
        """Free everything this scorer holds (end of the run)."""


class JudgeScorer(Scorer):
    """P(Yes) of a judge model asked whether the steps so far are correct and on track (see the module docstring)."""

    name = "judge"
    reserve = JUDGE_REPLY_TOKENS

    def __init__(self, engine: Engine, model: str, usage: Usage, prompt: MathPrompt = DEFAULT_PROMPT):
        super().__init__()
        self.engine = engine
        self.model = model
        self.usage = usage
        self.prompt = prompt  # the run's prompt: the judge reads the question as the generator did
        self._prompt: Branch | None = None  # the question, evaluated once on the judge
        self._opening = asyncio.Lock()
        self._slots = asyncio.Semaphore(JUDGE_CONCURRENCY)
        self._readers: dict[Partial, Branch] = {}  # the judge's branch per node: prompt + the node's steps

    async def score(self, question: str, partial: Partial) -> float:
        async with self._slots:
            reader = await self._reader(question, partial)
            (asked,) = await reader.fork(1)
            try:
                await asked.append(JUDGE_TURN)
                return await reply_p_yes(asked)
            finally:
                asked.release()

    async def _reader(self, question: str, partial: Partial) -> Branch:
        """The judge's branch holding the prompt and ``partial``'s steps."""
        if partial.branch.model == self.model:
            return partial.branch  # the judge wrote the steps itself: its branch holds them already
        async with self._opening:
            if self._prompt is None:
                self._prompt = await self.engine.open(self.prompt.messages(question), self.usage, model=self.model)
        parent = self._readers.get(partial.parent) if partial.parent is not None else None
        (reader,) = await (parent or self._prompt).fork(1)
        self._readers[partial] = reader
        await reader.append(partial.step if parent is not None else "".join(partial.steps))
        return reader

    def forget(self, partial: Partial) -> None:
        reader = self._readers.pop(partial, None)
        if reader is not None:
            reader.release()

    def close(self) -> None:
        for reader in [*self._readers.values(), *([self._prompt] if self._prompt is not None else [])]:
            reader.release()
        self._readers.clear()


class ProbeScorer(Scorer):
    """The agreement of short forced answers sampled from the partial solution (see the module docstring)."""

    name = "probe"
    reserve = PROBES * PROBE_TOKENS

    def __init__(self, params: SamplingParams, seed: int | None):
        super().__init__()
        self.params = replace(params, max_tokens=PROBE_TOKENS, stop=(), logprobs=False, top_logprobs=0)
        self.seed = seed
        self._probes = 0  # probes sampled so far: each gets its own seed

    async def score(self, question: str, partial: Partial) -> float:
        probes = await partial.branch.fork(PROBES)
        try:
            answers = await asyncio.gather(*(self._answer(probe) for probe in probes))
        finally:
            for probe in probes:
                probe.release()
        groups = vote(list(answers)).groups
        return max(groups.values(), default=0.0) / PROBES

    async def _answer(self, probe: Branch) -> str | None:
        await probe.append(PROBE)
        box = len(probe.text) - len("\\boxed{")
        sampled_before = len(probe.tokens)
        seed = None if self.seed is None else self.seed + PROBE_SEEDS + self._probes
        self._probes += 1
        await probe.extend(replace(self.params, seed=seed), lambda b: states_answer(b.text[box:]))
        self.generated += len(probe.tokens) - sampled_before
        return extract_answer(probe.text[box:], last_number=False)


class LogprobScorer(Scorer):
    """exp(mean token log-probability) of the last step (see the module docstring)."""

    name = "logprob"
    needs_logprobs = True

    async def score(self, question: str, partial: Partial) -> float:
        if partial.tokens == 0:
            return NO_STEP_TOKENS
        logprobs = partial.branch.token_logprobs[-partial.tokens:]
        if len(logprobs) < partial.tokens:
            raise PonderError("the logprob scorer needs per-token logprobs, which this engine did not return")
        return math.exp(sum(logprobs) / len(logprobs))


class HiddenScorer(Scorer):
    """The model's correctness probe on the partial solution's final hidden state (see the module docstring)."""

    name = "hidden"
    reserve = 1  # the step's last token, evaluated to read the vector (counted as scored_tokens)

    async def score(self, question: str, partial: Partial) -> float:
        from ..probes import probe_score

        return await probe_score(partial.branch)


AGGREGATIONS = {"last": lambda scores: scores[-1], "min": min, "prod": math.prod}


def aggregate(scores: Sequence[float], how: str) -> float:
    """The value of a path from the scores of its steps, in order."""
    return AGGREGATIONS[how](scores)


def get_scorer(name: str, *, engine: Engine, usage: Usage, judge: str = DEFAULT_JUDGE,
               params: SamplingParams = SamplingParams(), seed: int | None = None,
               prompt: MathPrompt = DEFAULT_PROMPT) -> Scorer:
    """The scorer called ``name`` for one run: ``judge`` names the judge model (a model of ``engine``), which reads
    the question in the run's ``prompt``; ``params`` and ``seed`` are how probes sample."""
    if name == "judge":
        return JudgeScorer(engine, judge, usage, prompt)
    if name == "probe":
        return ProbeScorer(params, seed)
    if name == "logprob":
        return LogprobScorer()
    if name == "hidden":
        return HiddenScorer()
    raise PonderError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)}")


def check_aggregation(how: str) -> None:
    if how not in AGGREGATIONS:
        raise PonderError(f"unknown aggregation {how!r}; choose one of: {', '.join(AGGREGATIONS)}")
