"""The program check: when a solution contains Python code, run it in the sandbox and compare what it prints with
the answer the solution states.

Scores: 1.0 when the program's printed result equals the stated answer, 0.0 when it prints a different one, and 0.5
(no evidence either way) when there is no code, no stated answer, or the program fails or prints no answer.
"""

from __future__ import annotations

import asyncio
import os
import re

from ..answers import equivalent, extract_answer
from ..engine.base import Branch
from ..sandbox import Limits, run_python

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
AGREES, NO_EVIDENCE, DISAGREES = 1.0, 0.5, 0.0


def last_program(text: str) -> str | None:
    """The last fenced code block of ``text`` (the finished program, when a solution refines its code)."""
    blocks = CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


class ProgramVerifier:
    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self._slots = asyncio.Semaphore(os.cpu_count() or 1)  # one program per core at a time

    async def score(self, question: str, candidate: Branch) -> float:
        program, stated = last_program(candidate.text), extract_answer(candidate.text)
        if program is None or stated is None:
            return NO_EVIDENCE
        async with self._slots:
            outcome = await run_python(program, self.limits)
        printed = extract_answer(outcome.stdout) if outcome.ok else None
        if printed is None:
            return NO_EVIDENCE
        return AGREES if equivalent(printed, stated) else DISAGREES
