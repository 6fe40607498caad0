"""The analyses of the correctness probe's uses: ``auto_probe`` (the tie-break replayed on a live ``auto`` run),
``auto_stats``' tie-break figures and its SC curve at auto's tokens, and ``step_probe``'s rebuilding of a search
tree on the engine."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.analysis import auto_probe, auto_stats, step_probe
from ponder.engine.fake import FakeEngine


def branch(answer, correct, kind="reasoning", logprob=-0.1, arm=None):
    return {"answer": answer, "correct": correct, "mean_logprob": logprob, "finish_reason": "stop",
            "details": {"arm": arm or f"{kind}-sampled", "kind": kind}}


WEIGHTS = {"program-sampled": 1.25, "reasoning-sampled": 1.0}


def test_each_rule_answers_an_unsettled_problem_its_own_way():
    split = {"branches": [
        branch("5", False, logprob=-0.05),        # 0: the greedy reasoning, likeliest
        branch("8", False, kind="program"),       # 1
        branch("7", True, logprob=-0.3),          # 2: the probe's pick
        branch(None, False, kind="program"),      # 3: a failed program, no vote
    ]}
    got = auto_probe.decide(split, {0: 0.2, 2: 0.9}, WEIGHTS)
    assert got == {"vote": False, "probe tie-break": True, "probe pick": True, "logprob tie-break": False,
                   "greedy": False, "any right": True}  # every answer has one branch: the scores decide
    led = {"branches": split["branches"][:3] + [branch("8", False, kind="program")]}  # 8 leads: the vote stands
    got = auto_probe.decide(led, {0: 0.2, 2: 0.9}, WEIGHTS)
    assert got["vote"] is False and got["probe tie-break"] is False and got["probe pick"] is True


def test_scores_a_live_run_kept_are_matched_to_its_branches_arm_by_arm():
    record = {"details": {"tiebreak": {"by": "vote", "scores": [
        {"arm": "reasoning-greedy", "answer": "5", "score": 0.2},
        {"arm": "reasoning-sampled", "answer": "7", "score": 0.9}]}},
        "branches": [branch("5", False, arm="reasoning-greedy"), branch("8", False, kind="program"),
                     branch("7", True), branch("6", False, kind="program")]}
    assert auto_probe.kept_scores(record, "probe") == {0: 0.2, 2: 0.9}
    assert auto_probe.kept_scores(record, "logprob") is None  # those scores are log-probabilities
    assert auto_probe.kept_scores({"details": {"stopped": "max branches"}}, "probe") is None


def test_the_vote_of_a_tiebroken_run_is_read_from_its_votes():
    record = {"votes": {"8": 1.25, "7": 1.0}, "answer_classes": [{"answer": "8", "correct": False},
                                                                  {"answer": "7", "correct": True}]}
    assert auto_stats.vote_was_right(record) is False
    record["votes"] = {"7": 1.25, "8": 1.25}  # a tie goes to the first answer
    assert auto_stats.vote_was_right(record) is True


def test_the_sc_curve_is_read_between_its_points_and_held_at_its_ends():
    curve = [(391.0, 0.589), (701.0, 0.602), (1012.0, 0.659)]
    assert auto_stats.interpolate(curve, 895.0) == pytest.approx(0.6376, abs=1e-4)
    assert auto_stats.interpolate(curve, 701.0) == 0.602
    assert auto_stats.interpolate(curve, 100.0) == 0.589  # fewer tokens than one sample: not extrapolated
    assert auto_stats.interpolate(curve, 5000.0) == 0.659


def test_a_tree_is_rebuilt_node_by_node_and_each_step_end_read():
    nodes = [{"id": 0, "parent": None, "depth": 0, "step": ""},
             {"id": 1, "parent": 0, "depth": 1, "step": "First.\n\n"},
             {"id": 2, "parent": 0, "depth": 1, "step": "Other.\n\n"},
             {"id": 3, "parent": 1, "depth": 2, "step": "Then \\boxed{7}"}]
    engine = FakeEngine(["unused"], hidden_fn=lambda context: [float(len(context)), float("boxed" in context)])
    vectors = asyncio.run(step_probe.read_tree(engine, "Q: ", nodes))
    base = len("Q: ")
    assert {k: v.tolist() for k, v in vectors.items()} == {
        1: [base + 8, 0.0], 2: [base + 8, 0.0], 3: [base + 8 + 14, 1.0]}
    assert engine.stats().live_branches == 0
