"""Verifiers that ask a model "is this solution correct?" and read P(Yes) from its next-token log-probabilities.

The score is P(Yes) / (P(Yes) + P(No)): ``Branch.score`` gives the log-probability of each reply after the question,
and the question's own log-probability cancels in the ratio.
"""

from __future__ import annotations

import asyncio
import math

from ..engine.base import Branch, Engine, Message

# Appended to the candidate's own branch, so the question and solution already in its KV cells are reused. Plain
# text in the assistant's turn: engines score continuations as text, without chat-template markup.
SELF_CHECK = "\n\nVerification: is the final answer above correct? Reply Yes or No.\nReply:"

JUDGE_INSTRUCTION = ("Below are a math problem and a proposed solution. Is the solution's final answer correct? "
                     "Reply with Yes or No only.")


def p_yes(yes_logprob: float, no_logprob: float) -> float:
    return 1.0 / (1.0 + math.exp(no_logprob - yes_logprob))


def judge_messages(question: str, solution: str) -> list[Message]:
    content = f"{JUDGE_INSTRUCTION}\n\nProblem:\n{question.strip()}\n\nProposed solution:\n{solution.strip()}"
    return [{"role": "user", "content": content}]


class SelfVerifier:
    """The generating model judges its own solution, continuing the candidate's branch."""

    async def score(self, question: str, candidate: Branch) -> float:
        yes, no = await asyncio.gather(candidate.score(SELF_CHECK + " Yes"), candidate.score(SELF_CHECK + " No"))
        return p_yes(yes, no)


class JudgeVerifier:
    """A second model reads the problem and the candidate's text in a fresh prompt, evaluated once per candidate and
    shared by the Yes and No probes. The judge is a model of the generating engine (``engine.open(model=judge)``),
    so its forward passes take turns with the generator's on the one worker."""

    def __init__(self, engine: Engine, judge: str):
        self.engine = engine
        self.judge = judge

    async def score(self, question: str, candidate: Branch) -> float:
        prompt = await self.engine.open(judge_messages(question, candidate.text), candidate.usage, model=self.judge)
        try:
            yes, no = await asyncio.gather(prompt.score("Yes"), prompt.score("No"))
        finally:
            prompt.release()
        return p_yes(yes, no)
