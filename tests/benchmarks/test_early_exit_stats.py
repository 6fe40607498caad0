"""benchmarks/analysis/early_exit_stats.py: the headroom of a plain run and the pairing of a probed run with it, on
hand-written results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.analysis import early_exit_stats as stats_module

REPO = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "benchmarks.analysis.early_exit_stats"]

TRACE = "Each box holds 6 eggs, so 3 boxes hold 3 * 6 = 18 eggs. " * 2 + "So the answer is 18."


def write_results(path: Path, problems: list[dict]) -> Path:
    header = {"ponder_results": 1, "strategy": "sc", "config": {"n": 1, "options": {}}, "model": {"name": "m"}}
    path.write_text("".join(json.dumps(line) + "\n" for line in [header, *problems]))
    return path


def branch(text: str, answer: str | None, tokens: int, early_exit: dict | None = None) -> dict:
    return {"text": text, "answer": answer, "generated_tokens": tokens,
            "details": {"early_exit": early_exit} if early_exit else {}}


def test_the_first_statement_is_found_as_an_equal_number_not_as_a_digit_inside_another():
    assert stats_module.first_statement_end("Buy 180 then 18.0 more", "18") == len("Buy 180 then 18.0")
    assert stats_module.first_statement_end("It costs $1,200 in all", "1200") == len("It costs $1,200")
    assert stats_module.first_statement_end("so x = \\frac{1}{2}", "\\frac{1}{2}") == len("so x = \\frac{1}{2}")
    assert stats_module.first_statement_end("no answer here", "7") is None


def test_the_headroom_is_the_share_of_answered_text_after_the_first_statement():
    rows = {"p": {"branches": [
        branch(TRACE, "18", 40),
        branch("It is 5. " + "x" * 91, "5", 30),   # 100 characters: 93 follow "It is 5"
        branch("rambling without end", None, 60),  # unanswered: not counted
    ]}}
    share, stating, answered = stats_module.headroom(rows)
    first = TRACE.index("18") + 2
    assert (stating, answered) == (2, 2)
    assert share == pytest.approx(((len(TRACE) - first) + (100 - len("It is 5"))) / (len(TRACE) + 100))


def test_the_command_prints_the_headroom_alone_and_pairs_a_probed_run_with_its_full_traces(tmp_path):
    base = write_results(tmp_path / "base.jsonl", [
        {"id": "p", "gold": "18", "correct": True, "usage": {"generated_tokens": 40},
         "branches": [branch(TRACE, "18", 40)]}])
    probed = write_results(tmp_path / "probed.jsonl", [
        {"id": "p", "gold": "18", "correct": True, "usage": {"generated_tokens": 25, "probe_tokens": 10},
         "branches": [branch(TRACE[:110], "18", 25, {"exit": "probe", "probes": [
             {"answer": "18", "hesitant": False}, {"answer": "18", "hesitant": False}]})]}])

    alone = subprocess.run([*COMMAND, str(base)], cwd=REPO, capture_output=True, text=True, check=True)
    assert "1 of 1 answered branches state it" in alone.stdout and "probes" not in alone.stdout

    both = subprocess.run([*COMMAND, str(base), str(probed)], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    assert "base generated 40; probed generated 25 + probe 10 = 35 (-12.5% against base)" in both
    assert "ended by probe 1 (100%)" in both
    assert "answer correct 100%; same answer as the branch's full trace 100% (1 compared)" in both
    assert "tokens saved per exit: median 15" in both


def test_a_missing_file_is_one_line_and_a_non_zero_exit(tmp_path):
    done = subprocess.run([*COMMAND, str(tmp_path / "none.jsonl")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "no results file" in done.stderr and "Traceback" not in done.stderr
