"""Answer probes: what an early exit appends to a fork of a branch to ask the model for its answer so far
(``PROBE``), how the reply is read (``probed_answer``, ``Probe``), and the rules that decide when the probes of a
branch have settled its answer (``ProbeRule``: ``AgreeingProbes``, Dynasor-CoT / Certaindex; ``ConvergingProbes``,
ES-CoT-style)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from ..answers import equivalent
from ..engine.base import PonderError

# Dynasor-CoT's probe (hao-ai-lab/Dynasor, dynasor/cot.py), appended to a fork of the branch right where its text
# stops -- mid-sentence, inside the thinking of a reasoning model: the model completes the box with its answer so far.
PROBE = "... Oh, I suddenly got the answer to the whole problem, **Final Answer**\n\n\\[ \\boxed{"
# A probe reply holding one of these (lower-cased substring, as Dynasor matches them) is not a confident answer.
HESITATION_WORDS = ("wait", "hold", "but", "okay", "no", "hmm")


def probed_answer(reply: str) -> str | None:
    """The answer in a probe's reply: its text up to the first ``}`` that closes no ``{`` of its own (the one closing
    the probe's ``\\boxed{``), stripped; None when the reply never closes the box or the box is empty."""
    depth = 0
    for i, char in enumerate(reply):
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return reply[:i].strip() or None
            depth -= 1
    return None


@dataclass
class Probe:
    """One probe of a branch: when it was taken and what the reply said."""

    at: int  # tokens the branch had generated when it was probed
    answer: str | None
    hesitant: bool  # the reply holds a hesitation word

    @classmethod
    def of(cls, at: int, reply: str) -> Probe:
        lowered = reply.lower()
        return cls(at, probed_answer(reply), any(word in lowered for word in HESITATION_WORDS))

    def to_dict(self) -> dict:
        return {"at": self.at, "answer": self.answer, "hesitant": self.hesitant}


class ProbeRule(ABC):
    """How often a branch is probed and how long a reply may be (``every`` generated tokens, ``tokens`` tokens of
    greedy reply), and when the probes so far settle the branch's answer."""

    name: str  # as written in the early_exit option

    def __init__(self, every: int = 32, tokens: int = 20):
        if every < 1 or tokens < 1:
            raise PonderError(f"{self.name}: every and tokens must be at least 1, got every={every}, tokens={tokens}")
        self.every = every
        self.tokens = tokens

    @abstractmethod
    def settled(self, probes: Sequence[Probe]) -> str | None:
        """The answer to stop the branch with, given its probes in order, or None to go on."""


class AgreeingProbes(ProbeRule):
    """Dynasor-CoT's rule (Certaindex): stop once the last ``window`` probes all gave an answer, the same one (by
    ``ponder.answers.equivalent``), and no reply among them hesitated. Dynasor's defaults are every 32 tokens (its
    servers) or 64 (its effort levels) and a window of 2 to 8; ours are 32 and 3, to be tuned on dev data. (The
    published ``should_early_exit`` helper of Dynasor returns True even when the answers disagree; this follows the
    inline check of its ``cot.py``.)"""

    name = "probe"

    def __init__(self, every: int = 32, tokens: int = 20, window: int = 3):
        super().__init__(every, tokens)
        if window < 1:
            raise PonderError(f"probe: window must be at least 1, got {window}")
        self.window = window

    def settled(self, probes: Sequence[Probe]) -> str | None:
        last = probes[-self.window:]
        if len(last) < self.window or any(p.answer is None or p.hesitant for p in last):
            return None
        answer = last[-1].answer
        return answer if all(equivalent(p.answer, answer) for p in last[:-1]) else None


class ConvergingProbes(ProbeRule):
    """ES-CoT-style convergence (Mao et al., arXiv 2509.14004): stop when the current run of identical probe answers
    is both long and a jump from how often the answer changed before it. The paper's exact test is not public; this is
    our run-jump rule:

    Let the last ``r`` probes give one answer (the current run) and the ``k`` probes before them have made ``c``
    changes among the ``k`` transitions that lead up to the run (from each of them to the next; an empty answer is
    never equal to anything, so it counts as a change). Under the null hypothesis that the answer changes at every
    probe independently with probability ``p = (c + 1) / (k + 2)`` (the Laplace estimate from the history), a run at
    least ``r`` long has probability ``(1 - p) ** (r - 1)``. Stop when that is at most ``alpha`` and ``r >= min_run``.
    An answer that held from the first probe (``p = 1/2``) needs a run of 6 at ``alpha = 0.05``; after three quick
    changes (``p = 4/5``) a run of 3 is enough. No hesitation words: ES-CoT has none. The defaults (``min_run=3``,
    ``alpha=0.05``) are not tuned: on the bundled 1.5B's GSM8K dev traces (docs/findings/thinking-control.md, issue 15)
    no setting can pay for the probes, since only 17 % of a trace follows its answer's first statement; tune them on a
    reasoning model's dev traces."""

    name = "converge"

    def __init__(self, every: int = 32, tokens: int = 20, min_run: int = 3, alpha: float = 0.05):
        super().__init__(every, tokens)
        if min_run < 1 or not 0.0 < alpha < 1.0:
            raise PonderError(f"converge: min_run must be at least 1 and alpha in (0, 1), got min_run={min_run}, "
                              f"alpha={alpha}")
        self.min_run = min_run
        self.alpha = alpha

    def settled(self, probes: Sequence[Probe]) -> str | None:
        answers = [probe.answer for probe in probes]
        answer = answers[-1] if answers else None
        if answer is None:
            return None
        run = 1
        while run < len(answers) and equivalent(answers[-run - 1], answer):
            run += 1
        before = len(answers) - run  # probes before the run, each followed by one transition
        changes = sum(not equivalent(a, b) for a, b in zip(answers[:before], answers[1:before + 1]))
        change_p = (changes + 1) / (before + 2)
        return answer if run >= self.min_run and (1.0 - change_p) ** (run - 1) <= self.alpha else None
