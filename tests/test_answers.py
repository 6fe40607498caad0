import pytest

from ponder.answers import equivalent, extract_answer, vote


@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{72}.", "72"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The answer is 1,000.", "1000"),
    ("#### 1,234,567", "1234567"),
    ("the answer is $-3$.", "-3"),
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("\\boxed{90^\\circ}", "90"),
    ("we had 5 apples and then 7.5 pears", "7.5"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b", [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "1/2"), ("72", "72.0"), ("-3", "-3.0"),
    ("\\frac{14}{3}", "14/3"), ("3\\sqrt{13}", "\\sqrt{117}"),
])
def test_equivalent_values(a, b):
    assert equivalent(a, b)


@pytest.mark.parametrize("a, b", [("3", "4"), ("-3", "3"), ("1/2", "2"), (None, "1"), ("x", None)])
def test_different_values(a, b):
    assert not equivalent(a, b)


def test_vote_groups_equivalent_answers_and_abstains_none():
    v = vote(["0.5", "1/2", "\\frac{1}{2}", "3", None, "3"])
    assert v.groups == {"0.5": 3.0, "3": 2.0}
    assert v.members == {"0.5": [0, 1, 2], "3": [3, 5]}
    assert v.winner == "0.5"


def test_vote_weights_and_ties():
    assert vote(["4", "5"], weights=[0.2, 0.9]).winner == "5"
    assert vote(["4", "5"]).winner == "4"  # a tie goes to the answer seen first
    assert vote([None, None]).winner is None


def test_a_cut_off_text_has_no_last_number_answer():
    assert extract_answer("First, 3. Then we compute 4", last_number=False) is None
    assert extract_answer("so \\boxed{4} and then 5", last_number=False) == "4"


@pytest.mark.parametrize("text, expected", [
    # A closed thinking block is not read: the answer is what follows it.
    ("<think>maybe \\boxed{3}? no.</think>\n\nThe answer is \\boxed{5}.", "5"),
    ("<think>12 + 30 = 42</think>\n\nSo the total is 41.", "41"),
    # DeepSeek-R1's template opens the thinking in the prompt: the closing tag alone ends it.
    ("Let me compute 6 * 7 = 42. Hmm, \\boxed{41}?\n</think>\n\n**Final Answer:** \\boxed{42}", "42"),
    ("<think>first</think> \\boxed{1} <think>second</think> \\boxed{2}", "2"),
    # Thinking that closed with nothing after it states no answer, whatever it weighed.
    ("<think>it is \\boxed{3}, or 4</think>", None),
    # A trace that never closes is read whole.
    ("<think>so far \\boxed{3} and then", "3"),
])
def test_an_answer_after_the_thinking(text, expected):
    assert extract_answer(text) == expected


def test_an_unclosed_trace_cut_off_has_no_last_number_answer():
    assert extract_answer("<think>we need 3 * 4 = 12", last_number=False) is None
    assert extract_answer("<think>we need 3 * 4 = 12") == "12"
