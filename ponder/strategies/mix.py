"""Mixed voting: chain-of-thought branches and program branches answer the same question, and their answers vote
together -- the vote of the mixture-of-thoughts cascade (Yue et al., 2024, "Large Language Model Cascades with
Mixture of Thoughts Representations"). Prose reasoning slips in arithmetic, programs misread the problem: the two
kinds err differently, so an answer both reach is more often right than one kind's majority.

A share ``program_share`` of the ``n`` branches (rounded) write programs as in ``pal``; the others reason step by step
as in ``sc`` (a run's ``prompt`` is theirs; the programs' is ``pal``'s, under the same system message). Both prompts
are opened once and the two kinds decode together in the engine's batches, under one usage and one token budget;
each program runs in the sandbox as soon as its branch finishes. Branch ``i`` of each kind is seeded as branch ``i``
of ``sc`` and of ``pal``. In the vote, program answers are counted first, so a tie goes to the answer the programs
gave.

The result lists the program branches, then the reasoning ones. Each branch's ``details`` give its ``kind``
(``program`` or ``cot``; a program branch also says what its program did, as in ``pal``), and
``Result.details["kinds"]`` how each kind voted: its branches, its votes, its leading answer.

Options:
  program_share  share of the branches that write programs, strictly between 0 and 1 (default 0.5)
  timeout        seconds a program may run, wall clock and CPU (default 5)
  weighting      how each branch's answer counts, as in ``sc``: ``majority`` (default), ``logprob``, ``probe``, ...
                 (see ``ponder.strategies.weights``), applied to both kinds
"""

from __future__ import annotations

import asyncio
import time

from ..answers import vote
from ..engine.base import Engine, PonderError, SamplingParams, Usage
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import BranchSummary, Result
from .pal import REPLY_START, Programs, program_params, program_prompt
from .pool import Pool
from .registry import Strategy, sampling_config
from .weights import get_weighting


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              program_share: float = 0.5, timeout: float = 5.0, weighting: str = "majority") -> Result:
    if not 0 < program_share < 1:
        raise PonderError(f"program_share must be between 0 and 1 (exclusive), got {program_share}")
    n_programs = round(n * program_share)
    n_cot = n - n_programs
    if n_programs < 1 or n_cot < 1:
        raise PonderError(f"mix needs a branch of each kind, but n={n} with program_share={program_share} gives "
                          f"{n_programs} program and {n_cot} reasoning branches")
    scheme = get_weighting(weighting)
    params = scheme.sampling(params)
    usage = Usage()
    programs = Programs(usage, timeout)
    started = time.perf_counter()
    async with Pool(engine, question, seed=seed, budget=budget, prompt=prompt, usage=usage) as cot, \
            Pool(engine, question, seed=seed, budget=cot.budget, prompt=program_prompt(prompt)) as coded:
        await coded.root.append(REPLY_START)
        async with asyncio.TaskGroup() as both:  # an error in one kind cancels the other
            both.create_task(coded.sample(scheme.sampling(program_params(params)), first=n_programs,
                                          after_decode=programs.run))
            both.create_task(cot.sample(params, first=n_cot))

        reasoned = {b: BranchSummary.of(b) for b in cot.branches}
        for summary in reasoned.values():
            summary.details = {"kind": "cot"}
        coded_summaries = [programs.summary(b) for b in coded.branches]
        for summary in coded_summaries:
            summary.details = {"kind": "program", **summary.details}
        program_answers = [programs.answer(b) for b in coded.finished]
        cot_answers = [reasoned[b].answer for b in cot.finished]
        usage.wall_s = time.perf_counter() - started
        weights = scheme.weigh([*coded.finished, *cot.finished])
        result = Result.from_vote(vote(program_answers + cot_answers, weights),
                                  coded_summaries + list(reasoned.values()), usage, engine.model, "mix",
                                  sampling_config(params))
        result.details["kinds"] = {"program": _tally(program_answers, len(coded.branches)),
                                   "cot": _tally(cot_answers, len(cot.branches))}
        return result


STRATEGY = Strategy("mix", run, "chain-of-thought and program branches (half and half) in one vote", "program")


def _tally(answers: list[str | None], branches: int) -> dict:
    """How one kind voted on its own."""
    own = vote(answers)
    return {"branches": branches, "votes": {answer: len(voters) for answer, voters in own.members.items()},
            "answer": own.winner}
