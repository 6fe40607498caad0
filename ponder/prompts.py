"""The prompt every math strategy starts from.

``MathPrompt`` is the chat a strategy opens for a question: an optional system message and a user turn written from a
template with a ``{question}`` placeholder. The default -- no system message, so the model's own default applies, and
the question followed by Qwen's recommended instruction for boxed answers -- is the prompt ponder has always used.
A caller that wants another one (``--system``, ``--prompt-template``, a server client's system message) builds a
``MathPrompt`` and passes it to the strategy as its ``prompt`` argument; every strategy takes it the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .engine.base import Message, PonderError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLACEHOLDER = "{question}"
DEFAULT_TEMPLATE = f"{PLACEHOLDER}\n{INSTRUCTION}"


@dataclass(frozen=True)
class MathPrompt:
    """``system``: the system message (None: none is sent, and the model's chat template puts its default one);
    ``template``: the user turn, ``{question}`` standing for the question. Only that placeholder is replaced, so other
    braces (``\\boxed{}``) are written as they are."""

    system: str | None = None
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self):
        if PLACEHOLDER not in self.template:
            raise PonderError(f"the prompt template has no {PLACEHOLDER} placeholder, so the question has nowhere to "
                              "go")

    @classmethod
    def from_file(cls, path: str | Path, system: str | None = None) -> MathPrompt:
        """The prompt whose user turn is the text of ``path`` (without the line break that ends the file)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PonderError(f"--prompt-template {path}: no such file") from None
        except UnicodeDecodeError:
            raise PonderError(f"--prompt-template {path}: not a UTF-8 text file") from None
        except OSError as e:
            raise PonderError(f"--prompt-template {path}: {e.strerror}") from None
        try:
            return cls(system, re.sub(r"\r?\n\Z", "", text))
        except PonderError as e:
            raise PonderError(f"--prompt-template {path}: {e}") from None

    def messages(self, question: str) -> list[Message]:
        """The chat for ``question``."""
        user: Message = {"role": "user", "content": self.template.replace(PLACEHOLDER, question.strip())}
        return [{"role": "system", "content": self.system}, user] if self.system is not None else [user]

    def to_dict(self) -> dict:
        """As a results file records it."""
        return asdict(self)


DEFAULT_PROMPT = MathPrompt()


def math_messages(question: str) -> list[Message]:
    """The default prompt's chat for ``question``."""
    return DEFAULT_PROMPT.messages(question)
