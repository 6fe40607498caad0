"""Final-answer extraction, equivalence (math-verify) and voting.

Extraction is ours (the model's text -> one answer string); equivalence is math-verify's, so "1/2", "0.5" and
"\\frac{1}{2}" count as one answer in a vote and as correct against a gold "\\frac{1}{2}".

Reasoning models think inside ``<think>...</think>`` and answer after it. Once the thinking has closed, only what
follows the last ``</think>`` is read: the candidates a model weighed while thinking are not its answer. The opening
tag may be missing (templates such as DeepSeek-R1's put ``<think>`` in the prompt), so the closing tag alone decides.
A trace that never closes (cut off while thinking) is read whole, like any other text: a ``\\boxed{}`` in it still
counts, and for a cut-off trace the caller passes ``last_number=False`` as for any text cut short.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # around a reasoning model's thinking

# A number as traces write it (signs, thousands separators, decimals); the last one is the fallback answer.
NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (and ``\\fbox{...}``), matching nested braces."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


def after_thinking(text: str) -> str:
    """What follows the last ``</think>`` of ``text``; all of ``text`` when no thinking has closed in it."""
    closed = text.rfind(THINK_CLOSE)
    return text if closed < 0 else text[closed + len(THINK_CLOSE):]


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer stated in ``text`` (after its thinking, see above), or None. Tried in order: the last
    ``\\boxed{}``, ``#### x``, "the answer is x", and (if ``last_number``) the last number in the text. Pass
    ``last_number=False`` for a text that was cut off: its last number is whatever the model was computing when it
    stopped, not an answer."""
    text = after_thinking(text)
    boxed = _boxed_contents(text)
    if boxed:
        return normalize(boxed[-1])
    for pattern in (_HASHES, _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            return normalize(matches[-1])
    numbers = re.findall(NUMBER, text) if last_number else []
    return normalize(numbers[-1]) if numbers else None


def normalize(answer: str) -> str | None:
    """Strip what never changes the value: surrounding $, units in \\text{}, thousands separators, a final period."""
    a = answer.strip().strip("$").strip()
    a = re.sub(r"^\\\(|\\\)$", "", a).strip()
    a = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", a)
    a = re.sub(r"\\[,!;:]|\\q?quad", "", a)  # LaTeX spacing
    a = a.replace("\\$", "").replace("\\%", "").replace("%", "")
    a = re.sub(r"\\(?:text|mbox|mathrm)\{\s*(?:dollars?|cents?|units?|meters?|cm|km|miles?|hours?|minutes?|"
               r"seconds?|days?|years?|pounds?|kg|g|feet|inches|degrees?)\s*\}", "", a)
    a = re.sub(r"\^\{?\\circ\}?", "", a)
    a = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), a)
    a = a.rstrip(".").strip()
    return a or None


def _in_main_thread() -> bool:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    timeout = 5 if _in_main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=timeout))
    except Exception:  # math-verify raises on pathological input; such an answer only equals itself
        return ()


def equivalent(a: str | None, b: str | None) -> bool:
    """True when the two answers are the same value (exact string match first, then math-verify)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    try:
        return bool(verify(list(pa), list(pb), timeout_seconds=5 if _in_main_thread() else None))
    except Exception:
        return False


@dataclass
class Vote:
    """Answers grouped by equivalence. ``groups`` maps a representative answer (the first seen) to its weight."""

    groups: dict[str, float] = field(default_factory=dict)
    members: dict[str, list[int]] = field(default_factory=dict)  # representative -> indices of the voters

    @property
    def winner(self) -> str | None:
        # Ties go to the answer seen first (dicts keep insertion order), which makes votes deterministic.
        return max(self.groups, key=self.groups.__getitem__) if self.groups else None

    @property
    def total(self) -> float:
        return sum(self.groups.values())


def vote(answers: list[str | None], weights: list[float] | None = None) -> Vote:
    """Group equivalent answers and add up their weights (1 each by default). ``None`` answers abstain."""
    result = Vote()
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        weight = 1.0 if weights is None else weights[i]
        rep = next((r for r in result.groups if equivalent(r, answer)), answer)
        result.groups[rep] = result.groups.get(rep, 0.0) + weight
        result.members.setdefault(rep, []).append(i)
    return result
