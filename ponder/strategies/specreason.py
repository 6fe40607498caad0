"""SpecReason (Pan et al., 2025): the small model drafts every reasoning step, the large model judges each draft in one
forward pass and rewrites only the steps it scores low, then writes the final answer.

Each model keeps one branch of the conversation, and both hold the same solution so far. Per step (a step ends at a
blank line, see ``ponder.search.steps``):

1. The small model drafts the step on a fork of its branch, so a rejected draft leaves nothing in its KV cells.
2. The large model reads the draft on a fork of its own branch (the *candidate*), and on a fork of that it reads
   SpecReason's judge question as a user turn followed by the assistant's prefix "I think the quality score is: ".
   The score is the expected digit: the next-token probabilities of "0" .. "9" (ten one-token ``score`` calls on
   the same fork), renormalised over the digits, weighted by their values. SpecReason's default reads the greedy
   digit instead; the expectation uses the same forward pass and does not jump between 6 and 7 on a near tie. The
   judge fork is released at once.
3. A score of at least ``threshold`` accepts the step: the candidate becomes the large model's branch (the step was
   evaluated once on the large model, and its KV cells are kept from step to step) and the draft the small
   model's. Below it, both forks are released, the large model rewrites the step on its own branch, and the rewrite
   is appended to the small model's branch.

A draft that finishes the solution (a complete ``\\boxed{}``, end of generation, or its token cap) is not judged: the
large model continues its branch to the end and writes the final answer. The solution is the large model's branch,
the result's one branch. ``details`` lists every step (its score, whether it was accepted, its tokens) and the
acceptance rate; ``usage.models`` holds each model's tokens.

The judge turn is written by ``ponder.verifiers.judging.judge_turn``, in ChatML, the chat markup of both bundled models
(Qwen2.5), so the engine's ``append`` must read those markers as the special tokens they name.

Sampling: ``params`` for every step of both models (each step reseeded from ``seed``); ``params.max_tokens`` caps the
solution's length, whoever wrote it; the budget caps generated plus scored tokens of both models (each draft leaves
room for its ten judge tokens). ``n`` is not used: there is one solution.

Options:
  threshold    accept a step scored at least this, on the 0-9 scale (default 7, SpecReason's). The bundled 1.5B
               scores the 0.5B's GSM8K steps between 5.8 and 6.6 (dev problems), so with the bundled pair 7 accepts
               none and 6.3 about half (docs/findings/two-models.md, "SpecReason")
  step_tokens  tokens per step at most (default 256)
  small        the drafting model (default qwen2.5-0.5b)
  large        the judging and final-answer model (default qwen2.5-1.5b)
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
from scipy.special import softmax

from ..answers import vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams
from ..verifiers.judging import judge_turn
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..search.steps import StepAllowance, extend_step
from .registry import Strategy
from .two_models import TwoModelRun

JUDGE_QUESTION = ("Evaluate the last reasoning step solely based on factual correctness and logical validity. Ignore "
                  "style, phrasing, or overall usefulness\u2014only judge whether the step is objectively correct and "
                  "logically follows from prior steps. Assign a score from 0 to 9.")
# Closes the assistant's turn, asks as the user, and opens the reply with SpecReason's prefix.
JUDGE_TURN = judge_turn(JUDGE_QUESTION, "I think the quality score is: ")
DIGITS = "0123456789"


def expected_digit(logprobs: list[float]) -> float:
    """The mean digit under the digits' probabilities (``logprobs[d]`` is digit d's), renormalised over the digits."""
    return float(softmax(np.asarray(logprobs)) @ np.arange(len(DIGITS)))


async def judge(candidate: Branch) -> float:
    """The large model's score of the step that ``candidate`` ends with, read on a fork of it."""
    (probe,) = await candidate.fork(1)
    try:
        await probe.append(JUDGE_TURN)
        logprobs = await asyncio.gather(*(probe.score(d) for d in DIGITS))
    finally:
        probe.release()
    return expected_digit(logprobs)


async def run(engine: Engine, question: str, *, n: int = 1, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              threshold: float = 7.0, step_tokens: int = 256, small: str = "qwen2.5-0.5b",
              large: str = "qwen2.5-1.5b") -> Result:
    if not 0.0 <= threshold <= 9.0:
        raise PonderError(f"threshold must be between 0 and 9, got {threshold}")
    steps: list[dict] = []

    def seeded(i: int) -> SamplingParams:
        return replace(params, seed=None if seed is None else seed + i)

    async with TwoModelRun(engine, question, prompt=prompt) as two:
        allowance = StepAllowance(step_tokens=step_tokens, max_tokens=params.max_tokens, budget=budget,
                                  usage=two.usage)
        drafter = await two.open(small)
        writer = await two.open(large)
        ended = False  # a model wrote the solution's end (else the allowance cut it)
        while not ended:
            i = len(steps)
            cap = allowance.step(writer, reserve=len(DIGITS))
            if cap < 1:
                break
            (draft,) = await drafter.fork(1)
            step = await extend_step(two.track(draft), seeded(i), cap=cap)
            if step.finished:
                break  # not judged: the large model writes the final answer below
            (candidate,) = await writer.fork(1)
            await two.track(candidate).append(step.text)
            score = await judge(candidate)
            record = {"score": round(score, 3), "accepted": score >= threshold, "draft_tokens": step.tokens}
            steps.append(record)
            if record["accepted"]:
                drafter.release()
                writer.release()
                drafter, writer = draft, candidate
                continue
            draft.release()
            candidate.release()
            cap = allowance.step(writer)
            if cap < 1:
                break
            rewrite = await extend_step(writer, seeded(i), cap=cap)
            record["rewrite_tokens"] = rewrite.tokens
            ended = rewrite.finished
            if not ended:
                await drafter.append(rewrite.text)
        solution = await allowance.finish(writer, seeded(len(steps)), ended=ended)
        result = two.result("specreason", vote([solution.answer]), [solution])
    judged = len(steps)
    result.details = {"steps": steps, "acceptance_rate": round(sum(s["accepted"] for s in steps) / judged, 4)
                      if judged else None}
    return result


STRATEGY = Strategy("specreason", run, "the small model drafts each step, the large one scores it (0-9) and "
                    "rewrites low-scored steps", "two models")
