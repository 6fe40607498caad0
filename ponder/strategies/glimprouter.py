"""GlimpRouter (Zeng et al., 2026): before each reasoning step the small model takes a one-token glimpse; when it is
unsure how to start the step, the large model writes the step, otherwise the small one does. The large model writes
the final answer.

Each model keeps one branch of the conversation, and both hold the same solution so far. Per step (a step ends at a
blank line, see ``ponder.search.steps``):

1. The glimpse: on a fork of the small model's branch, one greedy token with its top-20 log-probabilities. Its
   entropy -- of those 20 probabilities renormalised, in nats -- is GlimpRouter's routing signal. The fork is
   released at once and its token discarded, as in the paper: the chosen model regenerates the step.
2. An entropy of at least ``threshold`` routes the step to the large model, which writes it on its branch; below it,
   the small model writes it on its own. The step is then appended to the other model's branch, so both models'
   KV cells follow the conversation (only the step's tokens are evaluated).

A step that finishes the solution (a complete ``\\boxed{}``, end of generation, or its token cap) ends the loop. If
the large model wrote it, that is the end; if the small model did, the step is left out, and the large model
continues its own branch to the end. A glimpse that ends the generation at once routes to the large model. The
solution is the large model's branch, the result's one branch. ``details`` lists every step (its entropy, the model
that wrote it, its tokens, whether it was left out) and the share of steps the large model wrote; ``usage.models``
holds each model's tokens.

Sampling: ``params`` for every step of both models (each step reseeded from ``seed``); ``params.max_tokens`` caps the
solution's length, whoever wrote it; the budget caps generated tokens of both models, glimpses included. ``n`` is not
used: there is one solution.

Options:
  threshold    route a step to the large model when the glimpse's entropy is at least this, in nats (default 1.0)
  step_tokens  tokens per step at most (default 256)
  small        the glimpsing model (default qwen2.5-0.5b)
  large        the model for uncertain steps and the final answer (default qwen2.5-1.5b)
"""

from __future__ import annotations

from dataclasses import replace

from ..answers import vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..search.steps import StepAllowance, extend_step
from .registry import Strategy
from .two_models import TwoModelRun

GLIMPSE = SamplingParams(temperature=0.0, max_tokens=1, top_logprobs=20)


async def glimpse(branch: Branch) -> float | None:
    """The entropy of ``branch``'s next-token distribution (top 20, renormalised, nats); None when the model ends the
    generation instead."""
    (probe,) = await branch.fork(1)
    try:
        await probe.extend(GLIMPSE)
    finally:
        probe.release()
    return probe.entropies[-1] if len(probe.tokens) > len(branch.tokens) else None


async def run(engine: Engine, question: str, *, n: int = 1, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              threshold: float = 1.0, step_tokens: int = 256, small: str = "qwen2.5-0.5b",
              large: str = "qwen2.5-1.5b") -> Result:
    if threshold < 0.0:
        raise PonderError(f"threshold must be at least 0 nats, got {threshold}")
    steps: list[dict] = []

    def seeded(i: int) -> SamplingParams:
        return replace(params, seed=None if seed is None else seed + i)

    async with TwoModelRun(engine, question, prompt=prompt) as two:
        allowance = StepAllowance(step_tokens=step_tokens, max_tokens=params.max_tokens, budget=budget,
                                  usage=two.usage)
        small_branch = await two.open(small)
        large_branch = await two.open(large)
        ended = False  # the large model wrote the solution's end (else the allowance cut it)
        while True:
            cap = allowance.step(large_branch, reserve=1)  # one token of the budget for the glimpse
            if cap < 1:
                break
            entropy = await glimpse(small_branch)
            to_large = entropy is None or entropy >= threshold
            writer, reader = (large_branch, small_branch) if to_large else (small_branch, large_branch)
            step = await extend_step(writer, seeded(len(steps)), cap=cap)
            steps.append({"entropy": None if entropy is None else round(entropy, 4),
                          "by": "large" if to_large else "small", "tokens": step.tokens})
            if step.finished:
                ended = to_large
                if not to_large:
                    steps[-1]["left_out"] = True  # the large model writes the end instead
                break
            await reader.append(step.text)
        solution = await allowance.finish(large_branch, seeded(len(steps)), ended=ended)
        result = two.result("glimprouter", vote([solution.answer]), [solution])
    on_large = sum(s["by"] == "large" for s in steps)
    result.details = {"steps": steps, "large_share": round(on_large / len(steps), 4) if steps else None}
    return result


STRATEGY = Strategy("glimprouter", run, "per step, the small model's first-token entropy decides which model "
                    "writes the step", "two models")
