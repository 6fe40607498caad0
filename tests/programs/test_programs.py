"""Programs a model writes, read one way: where the program is, which answer its output gives. pal, mix and the
program verifier all read them through ``ponder.programs``, so a program gives the same answer through each."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import SamplingParams
from ponder.engine.fake import FakeEngine
from ponder.programs import printed_answer, program_in, program_of
from ponder.strategies import pal
from ponder.verifiers.program import AGREES, DISAGREES, NO_EVIDENCE, ProgramVerifier


def test_the_program_is_the_final_complete_fenced_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\nand ```\nprint(3)\n``` done"
    assert program_in(text) == "print(3)\n"
    assert program_in("no code, \\boxed{3}") is None


def test_a_block_open_at_the_end_is_a_program_only_if_the_reply_ended_there():
    text = "```python\nprint(1)\n```\nthen\n```python\nprint(2)\n"
    assert program_in(text, ended=True) == "print(2)\n"
    assert program_in(text) == "print(1)\n"  # cut off by a token limit: the last complete one
    assert program_in("```python\nprint(", ended=False) is None


def branch_of(text: str, max_tokens: int = 512):
    async def go():
        root = await FakeEngine([text]).open("q")
        (branch,) = await root.fork(1)
        return await branch.extend(SamplingParams(max_tokens=max_tokens))

    return asyncio.run(go())


def test_a_branch_cut_off_inside_its_code_block_has_no_program():
    assert program_of(branch_of("```python\nx = 1\nprint(x)\n")) == "x = 1\nprint(x)\n"  # it ended: stop
    cut = branch_of("```python\nx = 1\nprint(x)\n", max_tokens=3)
    assert cut.finish_reason == "length" and program_of(cut) is None


@pytest.mark.parametrize("stdout, answer", [
    ("18\n", "18"),
    ("step 1\n\n18\n\n", "18"),
    ("18.0\n", "18"),
    ("17.999999999999996\n", "18"),
    ("0.30000000000000004\n", "0.3"),
    ("Total: 18\n", "18"),
    ("x = 3/4\n", "3/4"),
    ("Janet makes 18 dollars\n", "18"),
    ("The answer is 7.\n", "7"),
    ("\\boxed{\\frac{1}{2}}\n", "\\frac{1}{2}"),
    ("sqrt(2)/2\n", "sqrt(2)/2"),
    ("2*pi\n", "2*\\pi"),
    ("2**10\n", "2^10"),
    ("-3\n", "-3"),
    ("1,000\n", "1000"),
    ("\n  \n", None),
])
def test_printed_answer(stdout, answer):
    assert printed_answer(stdout) == answer



PROGRAMS = [
    "print(6 * 7)\n",
    "print(17.999999999999996)\n",  # rounded: 18
    "total = 3 / 4\nprint(f'total = {total}')\n",  # the label is dropped
    "print(18)\nprint('done')\n",  # the last line states no answer: abstains, through pal and the verifier alike
    "print('Janet makes', 9 * 2, 'dollars')\n",
    "print(2**10)\n",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_program_gives_the_same_answer_through_pal_and_the_program_verifier(program):
    result = asyncio.run(pal.run(FakeEngine([f"{pal.REPLY_START}{program}```"]), "q", n=1, seed=0))
    answer = result.branches[0].answer  # what pal read from the program's output

    def verdict(stated: str) -> float:
        candidate = branch_of(f"Let me compute it.\n```python\n{program}```\nSo the answer is \\boxed{{{stated}}}.")
        return asyncio.run(ProgramVerifier().score("q", candidate))

    if answer is None:
        assert verdict("18") == NO_EVIDENCE
    else:
        assert verdict(answer) == AGREES and verdict("123456789") == DISAGREES
