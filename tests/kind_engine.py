"""A fake engine for strategies that mix reasoning and program branches (``mix``, ``auto``): branches opened on the
program prompt play the program replies in turn, the others the reasoning replies. And ``make_profile``, a small
``auto`` profile of the four arms for those tests and ``ponder tune``'s."""

from __future__ import annotations

from ponder.engine.fake import FakeEngine, Script
from ponder.strategies import pal
from ponder.strategies.auto_profile import Arm, Policy, Profile


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


def make_profile(model: str = "", **medium) -> Profile:
    arms = {a.name: a for a in (Arm("program-greedy", model, "program", 0.0, tokens=10),
                                Arm("reasoning-greedy", model, "reasoning", 0.0, tokens=20),
                                Arm("reasoning-sampled", model, "reasoning", 0.7, tokens=20),
                                Arm("program-sampled", model, "program", 0.7, tokens=10))}
    opening = ("reasoning-greedy", "program-greedy")
    policies = {"low": Policy(opening, (), 1, 2.0, 2),
                "medium": Policy(**{"open": opening, "then": ("reasoning-sampled", "program-sampled"), "wave": 2,
                                    "margin": 2.0, "max_branches": 6, **medium}),
                "high": Policy(opening, ("reasoning-sampled", "program-sampled"), 2, 3.0, 10)}
    return Profile("test", arms, policies, speed={"fake": {"step_s": {"1": 0.01, "2": 0.015}, "prompt_s": 0.001}})
