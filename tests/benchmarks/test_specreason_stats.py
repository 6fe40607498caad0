"""benchmarks/analysis/specreason_stats.py: acceptance, threshold shares, AUROC and tokens of a specreason run, on a
hand-written results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.analysis import specreason_stats as stats_module


def problem(correct: bool, scores: list[float], threshold: float, wall_s: float) -> dict:
    return {"id": "p", "gold": "1", "correct": correct,
            "usage": {"wall_s": wall_s, "models": {
                "qwen2.5-0.5b": {"generated_tokens": 100, "prompt_tokens": 10},
                "qwen2.5-1.5b": {"generated_tokens": 20, "scored_tokens": 10 * len(scores), "prompt_tokens": 300}}},
            "details": {"steps": [{"score": s, "accepted": s >= threshold, "draft_tokens": 30} for s in scores]}}


def write_results(path: Path, problems: list[dict], options: dict) -> Path:
    header = {"ponder_results": 1, "strategy": "specreason", "config": {"n": 1, "options": options},
              "model": {"name": "qwen2.5-0.5b"}}
    path.write_text("".join(json.dumps(line) + "\n" for line in [header, *problems]))
    return path


def test_a_run_reports_acceptance_threshold_shares_auroc_and_tokens_per_model(tmp_path):
    path = write_results(tmp_path / "spec.jsonl", [
        problem(True, [6.5, 6.0], 6.3, 10.0),   # lowest 6.0, mean 6.25, last 6.0
        problem(False, [5.5, 7.0], 6.3, 20.0),  # lowest 5.5, mean 6.25, last 7.0
        problem(False, [], 6.3, 30.0),          # the first draft finished: never judged, left out of the AUROC
    ], {"threshold": 6.3})
    stats = stats_module.summarize(path)
    assert stats["threshold"] == 6.3 and stats["problems"] == 3
    assert stats["accuracy"] == pytest.approx(1 / 3)
    assert stats["steps"] == 4 and stats["accepted"] == 0.5
    assert stats["would_accept"]["6.0"] == 0.75 and stats["would_accept"]["6.6"] == 0.25
    assert stats["would_accept"]["7.0"] == 0.25
    assert stats["auroc"] == {"lowest": 1.0, "mean": 0.5, "last": 0.0}
    large = stats["tokens_per_problem"]["qwen2.5-1.5b"]
    assert large == {"generated_tokens": 20, "scored_tokens": 13.3, "prompt_tokens": 300}  # 40 scored / 3, rounded
    assert stats["wall_s_per_problem"] == 20.0


def test_the_threshold_defaults_to_the_strategys_and_other_runs_are_refused(tmp_path):
    path = write_results(tmp_path / "spec.jsonl", [problem(True, [6.0], 7.0, 1.0)], {})
    assert stats_module.summarize(path)["threshold"] == 7.0
    other = tmp_path / "sc.jsonl"
    other.write_text(json.dumps({"ponder_results": 1, "strategy": "sc", "model": {"name": "m"}}) + "\n")
    with pytest.raises(SystemExit, match="not a specreason run"):
        stats_module.summarize(other)
