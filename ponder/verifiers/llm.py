"""Verifiers that ask a model "is this solution correct?": the generating model itself (``SelfVerifier``, on the
candidate's own branch) or a second model in a fresh prompt (``JudgeVerifier``). Both read P(Yes) of the reply
through ``ponder.verifiers.judging`` (its docstring says how, and what it costs).
"""

from __future__ import annotations

from ..engine.base import Branch, Engine, Message
from .judging import reply_p_yes

# Appended to the candidate's own branch, so the question and solution already in its KV cells are reused. Plain
# text in the assistant's turn: engines score continuations as text, without chat-template markup.
SELF_CHECK = "\n\nVerification: is the final answer above correct? Reply Yes or No.\nReply:"

JUDGE_INSTRUCTION = ("Below are a math problem and a proposed solution. Is the solution's final answer correct? "
                     "Reply with Yes or No only.")


def judge_messages(question: str, solution: str) -> list[Message]:
    content = f"{JUDGE_INSTRUCTION}\n\nProblem:\n{question.strip()}\n\nProposed solution:\n{solution.strip()}"
    return [{"role": "user", "content": content}]


class SelfVerifier:
    """The generating model judges its own solution, continuing the candidate's branch."""

    async def score(self, question: str, candidate: Branch) -> float:
        return await reply_p_yes(candidate, SELF_CHECK, replies=(" Yes", " No"))


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
            return await reply_p_yes(prompt)  # the prompt ends with the chat template's assistant turn
        finally:
            prompt.release()
