"""Programs a model writes, read: where the program is in a reply (``program_in``, ``program_of``) and which answer
its output gives (``printed_answer``)."""

from __future__ import annotations

import re

from ..answers import extract_answer, normalize
from ..engine.base import Branch

# A fenced code block, closed by its fence or left open at the end of the text (group 2 is then empty).
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(```|\Z)", re.DOTALL | re.IGNORECASE)

_MATH_WORDS = r"(?:sqrt|pi|exp|log|ln|sin|cos|tan|frac|oo|inf|infinity)\b"
_LABEL = re.compile(r"^[^=:\d]*[A-Za-z][^=:\d]*[:=]\s*")  # "Total: ", "x = ", "The answer is: "
_WORDS = re.compile(rf"\b(?!{_MATH_WORDS})[A-Za-z]{{3,}}")  # a word that is not a function name: a sentence
_PI = re.compile(r"\bpi\b")
_FLOAT = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][-+]?\d+)")


def program_in(text: str, *, ended: bool = False) -> str | None:
    """The program ``text`` holds: its last complete fenced code block (the finished program, when a reply refines
    its code). A block still open where the text ends is complete only if the reply ``ended`` there on its own (the
    model ended the generation, or stopped at the closing fence); cut off by a token limit it is unfinished."""
    program = None
    for block in CODE_BLOCK.finditer(text):
        if block.group(2) or ended:
            program = block.group(1)
    return program


def program_of(branch: Branch) -> str | None:
    """The program ``branch``'s reply holds (``program_in``; it ended on its own when its finish reason is stop)."""
    return program_in(branch.text, ended=branch.finish_reason == "stop")


def printed_answer(stdout: str) -> str | None:
    """The answer a program printed: its last non-empty line. A stated answer (``\\boxed{}``, "the answer is") is
    read as such; otherwise a "label:" or "name =" prefix is dropped, a sentence gives its last number, a float is
    rounded to 12 significant digits (a program's 17.999999999999996 is 18), and an expression is written as the
    answers of reasoning branches are (``2**10`` as ``2^10``, sympy's ``pi`` as ``\\pi``)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[-1]
    stated = extract_answer(line, last_number=False)
    if stated is not None:
        return stated
    value = _LABEL.sub("", line).strip()
    if _WORDS.search(value):
        return extract_answer(value)
    if _FLOAT.fullmatch(value):
        rounded = float(f"{float(value):.12g}")
        return str(int(rounded)) if rounded.is_integer() else repr(rounded)
    return normalize(_PI.sub(r"\\pi", value.replace("**", "^")))  # Python's notation as math-verify reads it
