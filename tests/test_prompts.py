"""The math prompt: the default one unchanged, a system message, a user-turn template from text or a file, and the
prompt arguments of the Python API."""

from __future__ import annotations

import pytest
from recording_engine import RecordingEngine

import ponder
from ponder.engine.base import PonderError
from ponder.prompts import DEFAULT_PROMPT, MathPrompt, math_messages

# Spelled out rather than built from the constants, so that any change to the default prompt fails here.
DEFAULT_USER_TURN = "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_the_default_prompt_is_unchanged_byte_for_byte():
    expected = [{"role": "user", "content": DEFAULT_USER_TURN}]
    assert MathPrompt().messages("  What is 2+2?\n") == expected
    assert math_messages("What is 2+2?") == expected == DEFAULT_PROMPT.messages("What is 2+2?")


def test_a_system_message_comes_before_the_user_turn():
    assert MathPrompt("You are terse.").messages("What is 2+2?") == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": DEFAULT_USER_TURN}]


def test_only_the_question_placeholder_is_replaced():
    prompt = MathPrompt(template="Q: {question}\nAnswer in \\boxed{} -- {not a placeholder}")
    assert prompt.messages("1+1?") == [{"role": "user",
                                        "content": "Q: 1+1?\nAnswer in \\boxed{} -- {not a placeholder}"}]


def test_a_template_without_the_placeholder_is_refused():
    with pytest.raises(PonderError, match=r"no \{question\} placeholder"):
        MathPrompt(template="Solve it.")


def test_a_template_file_loses_only_its_final_line_break(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("Problem:\n{question}\n\nBox the answer.\n\n", encoding="utf-8")
    prompt = MathPrompt.from_file(path, system="S")
    assert prompt == MathPrompt("S", "Problem:\n{question}\n\nBox the answer.\n")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"Solve it.\n", r"has no \{question\} placeholder"),
    (b"\xff\xfe{question}", "not a UTF-8 text file"),
])
def test_a_bad_template_file_is_a_one_line_error_naming_it(tmp_path, content, message):
    path = tmp_path / "template.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PonderError, match=message) as error:
        MathPrompt.from_file(path)
    assert str(error.value).startswith(f"--prompt-template {path}: ") and "\n" not in str(error.value)


def test_ask_takes_a_system_message_and_a_template():
    engine = RecordingEngine(["\\boxed{4}"])
    result = ponder.ask("What is 2+2?", "greedy", engine=engine, system="You are terse.",
                        prompt_template="{question} Answer in \\boxed{}.")
    assert result.answer == "4"
    assert engine.chats == [[{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "What is 2+2? Answer in \\boxed{}."}]]


def test_ask_asks_with_the_default_prompt_unless_told_otherwise():
    engine = RecordingEngine(["\\boxed{4}"])
    ponder.ask("What is 2+2?", "greedy", engine=engine)
    assert engine.chats == [[{"role": "user", "content": DEFAULT_USER_TURN}]]
