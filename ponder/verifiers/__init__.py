"""Verifiers: score a finished candidate solution in [0, 1] (higher = more likely correct), chosen by name.

* ``self`` -- the generating model, asked on the candidate's own branch whether its answer is correct: P(Yes).
* ``judge`` -- a second model of the same engine asked the same question in a fresh prompt (e.g. the bundled 1.5B).
* ``program`` -- the Python program in the solution, run in the sandbox; does it print the stated answer?
* ``probe`` -- the generating model's correctness probe on the candidate's final hidden state (``ponder.probes``).

Every verifier's tokens land in the candidate's (the request's) ``Usage``: ``self`` adds the tokens it scores (or,
on an engine that cannot score, the question it appends and the one token it generates; see ``llm``),
``judge`` also the prompt it opens.
"""

from __future__ import annotations

from typing import Protocol

from ..engine.base import Branch, Engine, PonderError
from .judging import DEFAULT_JUDGE
from .llm import JudgeVerifier, SelfVerifier
from .probe import ProbeVerifier
from .program import ProgramVerifier

VERIFIERS = ("self", "judge", "program", "probe")


class Verifier(Protocol):
    async def score(self, question: str, candidate: Branch) -> float: ...


def get_verifier(name: str, *, engine: Engine, judge: str = DEFAULT_JUDGE) -> Verifier:
    """The verifier called ``name`` for candidates from ``engine``; ``judge`` names the judge model (a bundled model
    or a GGUF path), which ``engine`` loads beside the generating model and schedules on the same worker."""
    if name == "self":
        return SelfVerifier()
    if name == "judge":
        return JudgeVerifier(engine, judge)
    if name == "program":
        return ProgramVerifier()
    if name == "probe":
        return ProbeVerifier()
    raise PonderError(f"unknown verifier {name!r}; choose one of: {', '.join(VERIFIERS)}")
