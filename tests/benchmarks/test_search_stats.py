"""benchmarks/analysis/search_stats.py: labels, AUROC and token figures of a search run, on a hand-written tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.analysis import search_stats



def node(id, parent, score=None, value=None, status="pruned", answer=None):
    return {"id": id, "parent": parent, "depth": 0, "step": "", "tokens": 1, "score": score, "value": value,
            "status": status, "answer": answer}


TREE = [
    node(0, None, status="kept"),
    node(1, 0, score=0.9, value=0.9, status="kept"),
    node(2, 0, score=0.2, value=0.2, status="kept"),
    node(3, 1, score=0.7, value=0.8, status="finished", answer="7"),  # right
    node(4, 1, score=0.8, value=0.3, status="finished", answer="5"),
    node(5, 2, score=0.1, value=0.1, status="finished", answer="5"),
    node(6, 2, score=0.5, value=0.5, status="pruned"),  # nothing finished below it: left out
]


def write_results(path: Path, nodes: list[dict]) -> None:
    header = {"ponder_results": 1, "strategy": "beam", "config": {"n": 4}, "model": {"name": "qwen2.5-0.5b"}}
    problem = {"id": "p1", "gold": "7", "prediction": "7", "correct": True,
               "usage": {"generated_tokens": 100, "scored_tokens": 10,
                         "models": {"qwen2.5-0.5b": {"generated_tokens": 100, "prompt_tokens": 20},
                                    "qwen2.5-1.5b": {"prompt_tokens": 50, "scored_tokens": 10}}},
               "details": {"tree": {"nodes": nodes, "chosen": [0, 1, 3]}}}
    path.write_text(json.dumps(header) + "\n" + json.dumps(problem) + "\n")


def test_a_tree_is_labelled_by_the_solutions_below_each_node(tmp_path):
    write_results(tmp_path / "beam.jsonl", TREE)
    stats = search_stats.summarize(tmp_path / "beam.jsonl")
    assert stats["accuracy"] == 1.0 and stats["some_solution_right"] == 1.0
    # "5" has two finished solutions against one "7" (wrong by majority), but 0.4 of value against 0.8
    assert stats["majority_vote"] == 0.0 and stats["weighted_vote"] == 1.0
    # finals: 0.8 right against 0.3 and 0.1 wrong -- separated
    assert stats["auroc_final"] == 1.0 and stats["finals"] == 3
    # steps on a right path: 1 (0.9) and 3 (0.7); on wrong ones: 2 (0.2), 4 (0.8), 5 (0.1); 6 has nothing below
    assert stats["steps"] == 5
    assert stats["auroc_steps"] == pytest.approx(5 / 6)
    # the generator's sampled tokens, and the judge's read + scoring tokens
    assert stats["tokens_per_problem"] == {"generated": 100, "judge": 60, "total": 160}


def test_a_file_without_trees_is_a_clear_error(tmp_path):
    path = tmp_path / "sc.jsonl"
    path.write_text(json.dumps({"ponder_results": 1, "strategy": "sc", "model": {"name": "m"}}) + "\n"
                    + json.dumps({"gold": "1", "correct": True, "usage": {}, "details": {}}) + "\n")
    with pytest.raises(SystemExit, match="no search trees"):
        search_stats.summarize(path)
