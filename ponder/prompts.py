"""The prompt every math strategy starts from (Qwen's recommended instruction for boxed answers)."""

from __future__ import annotations

from .engine.base import Message

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_messages(question: str) -> list[Message]:
    return [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]
