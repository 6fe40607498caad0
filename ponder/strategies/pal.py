"""Program-aided reasoning (PAL, Gao et al., 2022; program-of-thoughts, Chen et al., 2022): each branch writes a short
Python program that computes the answer, the sandbox runs it, and the printed values vote.

The bundled models are coder models, and writing the arithmetic as code leaves the arithmetic to Python. The prompt
asks for a program that prints only the final answer, and the reply is started with the opening of a python code
block (appended to the prompt once, so every fork shares it): each branch writes code from its first token and
stops at the closing fence, with no prose before or after it to pay for. The program prompt takes the place of the
math prompt's template, so a run's ``prompt`` may set the system message but not the template.

``n`` programs are sampled from the one prefilled prompt. Each runs in the sandbox as soon as its branch finishes,
while the other branches are still decoding (``Pool.sample(after_decode=...)``), at most one program per core at a
time across the whole process (a server runs many requests at once). A program's answer is the last non-empty line
it printed; where the program is in the reply and how its output is read are ``ponder.programs``' (``program_of``,
``printed_answer``), shared with ``mix`` and the program verifier. The answers vote with the same equivalence as
every strategy. A program that fails, times out or prints nothing abstains; its tokens still count. The sandbox's
wall time, summed over programs, is the usage's ``sandbox`` stage.

Every branch of the result carries ``details``: the ``program``, what it printed (``stdout``, its tail when long),
its ``status``, the last line of its error output (``error``) and its run time (``seconds``). The statuses: ``ok``,
``no output``, ``no answer`` (it printed no value, e.g. ``True``), ``timeout``, the name of the exception it raised
(``ZeroDivisionError``), ``killed by SIGKILL`` (the CPU limit), ``exit N``, ``no program`` (the reply was cut off
before its code block closed) and ``not run`` (the branch was cut short, or the vote was settled before its program
finished). ``Result.details["status"]`` counts them.

Options:
  until      ``none`` (default): all ``n`` programs at once; ``adaptive``: Adaptive-Consistency on the programs'
             answers -- start ``init`` branches, then ``step`` more whenever all have finished, and stop once the
             leading answer stays the leader with probability >= ``threshold`` (``rule``: ``beta`` or ``dirichlet``)
  init, step, threshold, rule   as in the ``adaptive`` strategy (defaults 4, 2, 0.95, beta); only with until=adaptive
  timeout    seconds a program may run, wall clock and CPU (default 5)
"""

from __future__ import annotations

import math
import re
import signal
from collections import Counter
from dataclasses import dataclass, replace

from ..engine.base import Branch, Engine, Message, PonderError, SamplingParams, Usage
from ..programs import Limits, Outcome, printed_answer, program_of, run_program
from ..prompts import DEFAULT_PROMPT, DEFAULT_TEMPLATE, MathPrompt
from ..result import BranchSummary, Result
from ..stopping import LeaderStable
from .pool import Pool
from .registry import Strategy, sampling_config

PROMPT = (
    "Write a Python program that solves this problem:\n\n{question}\n\n"
    "The program takes no input. Give each quantity of the problem a descriptive variable name, compute the answer "
    "step by step, and end with print(answer): the program must print only the final answer, a number or an "
    "expression, without words or units."
)
FENCE = "```"
REPLY_START = "```python\n"  # the reply opens the code block, so the first generated token is code
UNTIL = ("none", "adaptive")
STDOUT_KEPT = 1000  # characters of a program's output kept in the result (its end)


def program_prompt(prompt: MathPrompt = DEFAULT_PROMPT) -> MathPrompt:
    """The program-writing prompt, under ``prompt``'s system message."""
    return MathPrompt(prompt.system, PROMPT)


def program_messages(question: str, prompt: MathPrompt = DEFAULT_PROMPT) -> list[Message]:
    return program_prompt(prompt).messages(question)


def program_params(params: SamplingParams) -> SamplingParams:
    """``params`` that also stop at the closing fence of the code block."""
    return params if FENCE in params.stop else replace(params, stop=(*params.stop, FENCE))


@dataclass
class ProgramRun:
    """What one branch's program did."""

    program: str | None
    status: str
    answer: str | None = None
    stdout: str = ""
    error: str | None = None  # the last line of its error output, when it failed
    seconds: float = 0.0

    @classmethod
    def of(cls, program: str, outcome: Outcome, seconds: float) -> ProgramRun:
        if outcome.ok:
            answer = printed_answer(outcome.stdout)
            status = "ok" if answer is not None else "no answer" if outcome.stdout.strip() else "no output"
            return cls(program, status, answer, _tail(outcome.stdout), None, seconds)
        error = _last_line(outcome.stderr)
        return cls(program, _failure(outcome, error), None, _tail(outcome.stdout), error, seconds)

    def details(self) -> dict:
        return {"program": self.program, "stdout": self.stdout, "status": self.status, "error": self.error,
                "seconds": round(self.seconds, 4)}


def _failure(outcome: Outcome, error: str | None) -> str:
    """Why a program failed: ``timeout``, the name of the exception it raised, the signal that killed it (SIGKILL
    is the CPU limit), or its exit status."""
    if outcome.timed_out:
        return "timeout"
    raised = re.match(r"([A-Za-z_][\w.]*)(?::|$)", error or "") if "Traceback" in outcome.stderr else None
    if raised:
        return raised.group(1)
    if outcome.returncode > 128 and outcome.returncode - 128 in signal.valid_signals():
        return f"killed by {signal.Signals(outcome.returncode - 128).name}"  # the sandbox reports 128 + N
    return f"exit {outcome.returncode}"


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _tail(text: str) -> str:
    return text if len(text) <= STDOUT_KEPT else "…" + text[-STDOUT_KEPT:]


class Programs:
    """The program side of a run: runs each finished branch's program and remembers what it did."""

    def __init__(self, usage: Usage, timeout: float):
        if not timeout > 0:
            raise PonderError(f"timeout must be a positive number of seconds, got {timeout}")
        self.usage = usage
        self.limits = Limits(timeout_s=timeout, cpu_s=max(1, math.ceil(timeout)))
        self.runs: dict[Branch, ProgramRun] = {}

    async def run(self, branch: Branch) -> None:
        """Run ``branch``'s program in the sandbox (a ``Pool.sample`` after_decode hook)."""
        program = program_of(branch)
        if program is None:
            self.runs[branch] = ProgramRun(None, "no program")
            return
        outcome, seconds = await run_program(program, self.limits, self.usage)
        self.runs[branch] = ProgramRun.of(program, outcome, seconds)

    def answer(self, branch: Branch) -> str | None:
        """The value ``branch``'s program printed; None while it has not run, or when it abstains."""
        run = self.runs.get(branch)
        return run.answer if run is not None else None

    def summary(self, branch: Branch) -> BranchSummary:
        """``branch`` as the result reports it: its answer is its program's, its details say what the program did."""
        run = self.runs.get(branch) or ProgramRun(program_of(branch), "not run")
        return replace(BranchSummary.of(branch), answer=run.answer, details=run.details())


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              until: str = "none", init: int = 4, step: int = 2, threshold: float = 0.95, rule: str = "beta",
              timeout: float = 5.0) -> Result:
    if prompt.template != DEFAULT_TEMPLATE:
        raise PonderError("pal writes its own program prompt around the question, so a prompt template does not "
                          "apply to it (a system message does)")
    if until not in UNTIL:
        raise PonderError(f"unknown until {until!r}; choose one of: {', '.join(UNTIL)}")
    if step < 1:
        raise PonderError(f"step must be at least 1, got {step}")
    params = program_params(params)
    usage = Usage()
    programs = Programs(usage, timeout)
    settled = LeaderStable(threshold, rule, answer=programs.answer) if until == "adaptive" else None
    async with Pool(engine, question, seed=seed, budget=budget, prompt=program_prompt(prompt), usage=usage) as pool:
        await pool.root.append(REPLY_START)
        await pool.sample(params, first=n if settled is None else min(init, n), then=step, limit=n, until=settled,
                          after_decode=programs.run)
        result = pool.result("pal", sampling_config(params), summarize=programs.summary)
        result.details["status"] = dict(Counter(b.details["status"] for b in result.branches))
        return result


STRATEGY = Strategy("pal", run, "program-aided: n Python programs run in the sandbox as they finish, their printed "
                    "answers vote", "program", independent_samples=True, chat=program_messages,
                    branch_params=program_params)
