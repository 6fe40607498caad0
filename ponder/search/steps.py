"""Reasoning steps: the unit that step-wise strategies (SpecReason, GlimpRouter, and search over partial solutions)
route, judge and extend.

A step is what a model writes up to and including a delimiter: a blank line (``"\\n\\n"``) by default, as in
SpecReason, GlimpRouter and HF search-and-learn. The delimiter stays in the step's text and in the branch (its tokens
are in the KV cells), so the next step starts right after it, and a step carried to another model with
``Branch.append`` is exactly the text its writer holds.

A step that ends any other way -- end-of-generation, another stop string, its token cap, a halt -- finishes the
solution, and so does a step that states a complete ``\\boxed{...}`` answer.

``StepAllowance`` says how long the next step may be: within a cap per step, the solution's ``max_tokens`` and the
run's token budget (generated plus scored tokens, so a judge's reading is paid for like writing); it also records how
a solution it cut short ended.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..answers import _boxed_contents, extract_answer
from ..engine.base import Branch, PonderError, SamplingParams, StopIf, Usage
from ..result import BranchSummary

DELIMITER = "\n\n"


@dataclass
class Step:
    text: str  # the new text, delimiter included
    tokens: int  # tokens the model sampled for it
    finished: bool  # the solution ends with this step


def states_answer(text: str) -> bool:
    """True when ``text`` holds a ``\\boxed{...}`` whose braces are closed (read as answer extraction reads it)."""
    return bool(_boxed_contents(text))


async def extend_step(branch: Branch, params: SamplingParams, *, cap: int, delimiter: str = DELIMITER,
                      stop_if: StopIf | None = None) -> Step:
    """Let ``branch`` write one step of at most ``cap`` tokens, sampled with ``params``; ``stop_if`` halts it mid-step
    (e.g. a ``TokenBudget`` shared by steps written at the same time)."""
    start_text, start_tokens = len(branch.text), len(branch.tokens)
    await branch.extend(replace(params, stop=(*params.stop, delimiter), max_tokens=cap), stop_if)
    text = branch.text[start_text:]
    at_delimiter = branch.finish_reason == "stop" and branch.matched_stop == delimiter
    return Step(text, len(branch.tokens) - start_tokens, finished=not at_delimiter or states_answer(text))


class StepAllowance:
    """Token caps for a step-wise run: each step at most ``step_tokens``, the solution (every token of the branch that
    holds it, whoever wrote them) at most ``max_tokens``, and the run's generated plus scored tokens at most
    ``budget`` (None: no budget)."""

    def __init__(self, *, step_tokens: int, max_tokens: int, budget: int | None, usage: Usage):
        if step_tokens < 1:
            raise PonderError(f"step_tokens must be at least 1, got {step_tokens}")
        if budget is not None and budget < 1:
            raise PonderError(f"budget must be at least 1 token, got {budget}")
        self.step_tokens = step_tokens
        self.max_tokens = max_tokens
        self.budget = budget
        self.usage = usage

    def room(self, solution: Branch, *, reserve: int = 0) -> int:
        """Tokens left for ``solution`` to grow by, keeping ``reserve`` tokens of the budget for later work."""
        left = self.max_tokens - len(solution.tokens)
        if self.budget is not None:
            left = min(left, self.budget - self._spent() - reserve)
        return max(0, left)

    def step(self, solution: Branch, *, reserve: int = 0) -> int:
        """The cap of the next step (0: no room for one)."""
        return min(self.step_tokens, self.room(solution, reserve=reserve))

    async def finish(self, solution: Branch, params: SamplingParams, *, ended: bool) -> BranchSummary:
        """Let ``solution`` write its end in one extend with the room left (unless ``ended``: it already did), then
        its summary. The two-model strategies end this way: the large model writes the final answer."""
        room = self.room(solution)
        if not ended and room > 0:
            await solution.extend(replace(params, max_tokens=room))
            ended = True
        return self.summary(solution, ended=ended)

    def summary(self, solution: Branch, *, ended: bool) -> BranchSummary:
        """The result's record of ``solution``; ``ended`` says whether its last extend wrote the end. A solution
        that did not end with a stop was cut: its finish reason is "halted" when the budget is spent, else "length",
        and its last number is no answer (as for any branch cut off)."""
        summary = BranchSummary.of(solution)
        if ended and summary.finish_reason == "stop":
            return summary
        cut = "halted" if self.budget is not None and self._spent() >= self.budget else "length"
        return replace(summary, finish_reason=cut, answer=extract_answer(solution.text, last_number=False))

    def _spent(self) -> int:
        return self.usage.generated_tokens + self.usage.scored_tokens
