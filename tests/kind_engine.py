"""A fake engine for strategies that mix reasoning and program branches (``mix``, ``auto``): branches opened on the
program prompt play the program replies in turn, the others the reasoning replies."""

from __future__ import annotations

from ponder.engine.fake import FakeEngine, Script
from ponder.strategies import pal


def program(code: str) -> str:
    """A program reply as the model writes it: the code block that pal's reply start opens, closed."""
    return f"{pal.REPLY_START}{code}```"


class KindEngine(FakeEngine):
    def __init__(self, programs: list[str], reasoning: list[str], **kwargs):
        super().__init__(reasoning, **kwargs)
        self.program_replies = [Script(text) for text in programs]
        self.programs_handed = 0

    def _scripts_for(self, branch, n):
        if not branch.prompt.startswith("Write a Python program"):
            return super()._scripts_for(branch, n)
        replies = self.program_replies
        scripts = [replies[(self.programs_handed + i) % len(replies)] for i in range(n)]
        self.programs_handed += n
        return scripts
