"""The program check: when a solution contains Python code, run it in the sandbox and compare what it prints with
the answer the solution states. The program and its printed answer are read as ``pal`` reads them
(``ponder.programs``): the last complete code block, the answer its last printed line gives.

Scores: 1.0 when the program's printed result equals the stated answer, 0.0 when it prints a different one, and 0.5
(no evidence either way) when there is no code, no stated answer, or the program fails or prints no answer.
"""

from __future__ import annotations

from ..answers import equivalent, extract_answer
from ..engine.base import Branch
from ..programs import Limits, printed_answer, program_of, run_program

AGREES, NO_EVIDENCE, DISAGREES = 1.0, 0.5, 0.0


class ProgramVerifier:
    def __init__(self, limits: Limits = Limits()):
        self.limits = limits

    async def score(self, question: str, candidate: Branch) -> float:
        program, stated = program_of(candidate), extract_answer(candidate.text)
        if program is None or stated is None:
            return NO_EVIDENCE
        outcome, _ = await run_program(program, self.limits)
        printed = printed_answer(outcome.stdout) if outcome.ok else None
        if printed is None:
            return NO_EVIDENCE
        return AGREES if equivalent(printed, stated) else DISAGREES
