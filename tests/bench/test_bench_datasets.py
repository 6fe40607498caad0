"""Datasets of the benchmark harness: JSONL files, short names, reasoning-gym, selection, scoring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ponder.answers import extract_answer
from ponder.bench.datasets import SHORT_NAMES, load_dataset
from ponder.engine.base import PonderError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bench_problems.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_file_loads_every_field():
    dataset = load_dataset(str(FIXTURE))
    assert dataset.name == "bench_problems"
    assert [p.id for p in dataset.problems] == ["half", "thousand", "neg", "dollars", "four", "seven"]
    half = dataset.problems[0]
    assert (half.answer, half.level, half.subject) == ("\\frac{1}{2}", "1", "Arithmetic")
    assert dataset.problems[3].solution == "6 * 3 = 18"
    assert "math-verify" in dataset.scoring


@pytest.mark.parametrize("rows, message", [
    (['{"id": "a", "question": "q", "answer": "1"}', "{not json"], "bench.jsonl:2: not valid JSON"),
    ([{"id": "a", "question": "q"}], "bench.jsonl:1: missing field 'answer'"),
    ([{"id": "a", "question": "q", "answer": "1"}, {"id": "a", "question": "r", "answer": "2"}],
     "bench.jsonl:2: duplicate id 'a'"),
    (["[1, 2]"], "expected a JSON object"),
    ([], "no problems"),
])
def test_bad_jsonl_is_refused_with_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bench.jsonl", rows)
    with pytest.raises(PonderError, match=message.replace("[", r"\[")):
        load_dataset(str(path))


def test_short_name_resolves_through_ponder_data(tmp_path, monkeypatch):
    write_jsonl(tmp_path / SHORT_NAMES["amc23"], [{"id": "x", "question": "q", "answer": "3"}])
    monkeypatch.setenv("PONDER_DATA", str(tmp_path))
    dataset = load_dataset("amc23")
    assert dataset.name == "amc23" and dataset.source == str(tmp_path / "amc23.jsonl")
    assert [p.id for p in dataset.problems] == ["x"]


def test_short_name_resolves_relative_to_the_current_directory(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    write_jsonl(data / SHORT_NAMES["gsm8k"], [{"id": "g", "question": "q", "answer": "1"}])
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PONDER_DATA", raising=False)
    assert [p.id for p in load_dataset("gsm8k").problems] == ["g"]


def test_missing_short_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_DATA", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    import ponder.bench.datasets as datasets

    monkeypatch.setattr(datasets, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(PonderError) as error:
        load_dataset("math500")
    message = str(error.value)
    assert "math500_dev.jsonl" in message
    assert str(tmp_path / "nowhere" / "math500_dev.jsonl") in message and "$PONDER_DATA" in message
    assert str((tmp_path / ".." / "shared" / "data").resolve()) in message
    assert str((tmp_path / "repo" / ".." / "shared" / "data").resolve()) in message


def test_unknown_dataset_is_refused():
    with pytest.raises(PonderError, match="no dataset 'nope'"):
        load_dataset("nope")


def test_select_applies_shuffle_then_offset_then_limit():
    dataset = load_dataset(str(FIXTURE))
    ids = [p.id for p in dataset.problems]
    assert [p.id for p in dataset.select(offset=1, limit=2)] == ids[1:3]
    shuffled = [p.id for p in dataset.select(shuffle=True, seed=3)]
    assert sorted(shuffled) == sorted(ids) and shuffled != ids
    assert [p.id for p in dataset.select(shuffle=True, seed=3, offset=2, limit=3)] == shuffled[2:5]
    assert [p.id for p in dataset.select(shuffle=True, seed=3)] == shuffled  # the seed fixes the order
    assert [p.id for p in dataset.select(limit=100)] == ids


@pytest.mark.parametrize("kwargs, message", [
    ({"offset": 6}, "past the end"), ({"offset": -1}, "--offset must be >= 0"), ({"limit": 0}, "--limit must be"),
])
def test_bad_selection_is_refused(kwargs, message):
    with pytest.raises(PonderError, match=message):
        load_dataset(str(FIXTURE)).select(**kwargs)


def test_dataset_hash_follows_the_problems_not_the_file(tmp_path):
    rows = [{"id": "a", "question": "q", "answer": "1"}, {"id": "b", "question": "r", "answer": "2"}]
    first = load_dataset(str(write_jsonl(tmp_path / "a.jsonl", rows))).sha256
    rows_with_extras = [dict(r, solution="worked out") for r in rows]
    assert load_dataset(str(write_jsonl(tmp_path / "b.jsonl", rows_with_extras))).sha256 == first
    changed = [rows[0], dict(rows[1], answer="3")]
    assert load_dataset(str(write_jsonl(tmp_path / "c.jsonl", changed))).sha256 != first


# math-verify equivalence through the whole scoring path: the model's text -> extract_answer -> Dataset.score.
@pytest.mark.parametrize("text, gold, correct", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),  # fractions
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", True),
    ("\\boxed{1/3}", "0.33", False),  # a rounded value is not the fraction
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),  # LaTeX
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{x^2+2x}", "x(x+2)", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{6 - 5i}", "6-5i", True),
    ("\\boxed{1,000}", "1000", True),  # thousands separators
    ("The answer is 1,234,567.", "1234567", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{18 \\text{ dollars}}", "18", True),  # units and currency
    ("\\boxed{\\$18.00}", "18", True),
    ("\\boxed{12 \\text{ hours}}", "12", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{-3}", "-3", True),  # negative numbers
    ("\\boxed{3}", "-3", False),
    ("\\boxed{−5}", "-5", True),  # a Unicode minus sign
    ("\\boxed{25}", "025", True),  # AIME answers are written with three digits
    ("I could not solve it.", "4", False),  # no answer at all
])
def test_math_verify_scoring(tmp_path, text, gold, correct):
    dataset = load_dataset(str(write_jsonl(tmp_path / "one.jsonl", [{"id": "p", "question": "q", "answer": gold}])))
    assert dataset.score(extract_answer(text), dataset.problems[0]) is correct


def test_gym_dataset_generates_and_scores_with_its_own_rule():
    dataset = load_dataset("gym:basic_arithmetic?seed=3&size=5")
    assert dataset.name == "gym:basic_arithmetic?seed=3&size=5"
    assert "reasoning-gym" in dataset.scoring and "score_answer" in dataset.scoring
    assert [p.id for p in dataset.problems] == [f"basic_arithmetic-3-{i}" for i in range(5)]
    problem = dataset.problems[0]
    assert dataset.score(problem.answer, problem)
    assert not dataset.score(str(int(problem.answer) + 1), problem)
    assert not dataset.score(None, problem)
    # the same seed generates the same problems; another seed others
    assert load_dataset("gym:basic_arithmetic?seed=3&size=5").sha256 == dataset.sha256
    assert load_dataset("gym:basic_arithmetic?seed=4&size=5").sha256 != dataset.sha256


def test_gym_passes_extra_parameters_and_reports_bad_ones():
    dataset = load_dataset("gym:chain_sum?seed=1&size=3&min_terms=2&max_terms=2")
    assert len(dataset.problems) == 3
    with pytest.raises(PonderError, match="unknown reasoning-gym dataset 'no_such_task'"):
        load_dataset("gym:no_such_task?seed=1")
    with pytest.raises(PonderError, match="reasoning-gym cannot build"):
        load_dataset("gym:chain_sum?size=0")


def test_gym_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if it were not installed
    with pytest.raises(PonderError, match=r"'gym:chain_sum\?seed=1' needs reasoning-gym, an optional extra: "
                                          r'pip install "ponder\[gym\]"'):
        load_dataset("gym:chain_sum?seed=1")
