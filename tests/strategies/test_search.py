"""The step-level searches (beam, dvts, particles, astar) on the two-model fake engine: whom they keep, how they
resample, in which order A* pops, budgets, and that every node's KV cells are released as soon as it is dropped.

Each step of a script is one word and a blank line: one token (see ponder.engine.fake). Every fork of the generating
model takes its next script in turn and plays it from the fork's length, so the children of a node at depth d write
the (d+1)-th steps of the next scripts. The judge (the large model) answers P(Yes) by the last step it reads.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, FakeModel
from ponder.prompts import math_messages
from ponder.search.scorers import JUDGE_TURN, LogprobScorer
from ponder.strategies import STRATEGIES
from ponder.strategies.beam import share_out
from ponder.strategies.particles import resample, weights

GEN, JUDGE = "qwen2.5-0.5b", "qwen2.5-1.5b"
PROMPT_TOKENS = len(math_messages("q")[0]["content"].split())


def judge_by_last_step(values: dict[str, float], default: float = 0.5):
    """P(Yes) = ``values[s]`` for the longest ``s`` the judged steps end with, else ``default``."""
    ordered = sorted(values.items(), key=lambda kv: -len(kv[0]))

    def score_fn(context: str, reply: str) -> float:
        judged = context[:-len(JUDGE_TURN)]
        value = next((v for step, v in ordered if judged.endswith(step)), default)
        return math.log(value if reply == "Yes" else 1 - value)

    return score_fn


def engine_of(scripts: list[str], values: dict[str, float] | None = None) -> FakeEngine:
    judge = FakeModel(["unused"], score_fn=judge_by_last_step(values or {}))
    return FakeEngine(scripts, name=GEN, models={JUDGE: judge})


def run(strategy: str, engine: FakeEngine, *, n: int, seed: int = 0, **options):
    return asyncio.run(STRATEGIES[strategy](engine, "q", n=n, params=SamplingParams(), seed=seed, **options))


def nodes_of(result) -> dict[int, dict]:
    return {node["id"]: node for node in result.details["tree"]["nodes"]}


def assert_all_released(engine: FakeEngine) -> None:
    assert engine.stats().live_branches == 0 and engine.stats().kv_cells_used == 0


def long_scripts(count: int, steps: int) -> list[str]:
    """``count`` solutions of ``steps`` one-token steps, then an answer."""
    return ["".join(f"s{i}_{j}\n\n" for j in range(steps)) + f"\\boxed{{{i % 3}}}" for i in range(count)]


# ---- beam ---------------------------------------------------------------------------------------------------------

def test_beam_shares_the_candidates_out_over_the_beams():
    a, b, c = object(), object(), object()
    assert share_out([a, b], 8) == [(a, 4), (b, 4)]
    assert share_out([a], 8) == [(a, 8)]
    assert share_out([a, b, c], 8) == [(a, 3), (b, 3), (c, 2)]


def test_beam_keeps_the_top_n_over_m_each_round():
    first_steps = {"a\n\n": 0.2, "b\n\n": 0.9, "c\n\n": 0.5, "d\n\n": 0.7}
    scripts = [f"{x}\n\nx{k}\n\ny{k}\n\n\\boxed{{{k}}}" for k, x in enumerate("abcd")]
    engine = engine_of(scripts, {**first_steps, "x1\n\n": 0.3, "x3\n\n": 0.8, "y1\n\n": 0.4, "y3\n\n": 0.6})
    result = run("beam", engine, n=4, m=2)
    nodes = nodes_of(result)
    by_step = {node["step"]: node for node in nodes.values() if node["depth"] == 1}
    assert {s: by_step[s]["status"] for s in first_steps} == {"a\n\n": "pruned", "b\n\n": "kept",
                                                              "c\n\n": "pruned", "d\n\n": "kept"}
    for depth in range(1, max(node["depth"] for node in nodes.values())):
        layer = [node for node in nodes.values() if node["depth"] == depth and node["status"] != "finished"]
        kept = [node for node in layer if node["status"] == "kept"]
        assert len(kept) == min(2, len(layer))
        assert min(node["value"] for node in kept) >= max((node["value"] for node in layer if node not in kept),
                                                          default=0)
        for node in kept:  # each kept beam writes m = 2 candidates
            assert sum(child["parent"] == node["id"] for child in nodes.values()) == 2
    assert len(result.branches) == 4  # it stops once n solutions have finished
    assert_all_released(engine)


# ---- dvts ---------------------------------------------------------------------------------------------------------

def test_dvts_subtrees_each_keep_their_single_best_child():
    engine = engine_of(long_scripts(8, 3), {f"s{i}_{j}\n\n": (i * 7 + j * 3) % 10 / 10 + 0.05
                                            for i in range(8) for j in range(3)})
    result = run("dvts", engine, n=8, m=4)
    nodes = nodes_of(result)
    first = [node for node in nodes.values() if node["depth"] == 1]
    assert len(first) == 8
    for group in (first[:4], first[4:]):  # the two subtrees' first steps
        assert [node["status"] for node in group].count("kept") == 1
        best = max(group, key=lambda node: node["value"])
        assert best["status"] == "kept"
    for parent in [node for node in nodes.values() if node["status"] == "kept" and node["depth"] >= 1]:
        children = [node for node in nodes.values() if node["parent"] == parent["id"]]
        assert len(children) == 4
        grown = [child for child in children if child["status"] in ("kept", "open")]
        assert len(grown) <= 1 and all(c["value"] == max(x["value"] for x in children) for c in grown)
    assert_all_released(engine)


# ---- particles ----------------------------------------------------------------------------------------------------

def test_resampling_weights_are_the_softmax_of_the_logits():
    assert weights([0.5, 0.8, 0.2], 1.0) == pytest.approx(np.array([1, 4, 0.25]) / 5.25)
    assert weights([0.5, 0.8, 0.2], 1e6) == pytest.approx([1 / 3] * 3, rel=1e-4)  # a hot temperature: uniform
    assert weights([1.0, 0.0], 1.0)[0] == pytest.approx(1.0)  # certain values stay finite


def test_resampling_draws_in_proportion_to_the_weights():
    rng = np.random.default_rng(0)
    pool = [type("Node", (), {"value": value})() for value in (0.5, 0.8, 0.2, 0.6)]
    drawn = Counter(id(node) for _ in range(2000) for node in resample(pool, 4, 1.0, rng))
    observed = [drawn[id(node)] for node in pool]
    expected = weights([0.5, 0.8, 0.2, 0.6], 1.0) * 8000
    assert chisquare(observed, expected).pvalue > 0.01


def test_particles_carry_each_first_step_in_proportion_to_its_weight():
    values = {"a\n\n": 0.5, "b\n\n": 0.8, "c\n\n": 0.2, "d\n\n": 0.6}
    children = Counter()
    for seed in range(150):
        engine = engine_of([f"{x}\n\n\\boxed{{{k}}}" for k, x in enumerate("abcd")], values)
        nodes = nodes_of(run("particles", engine, n=4, seed=seed))
        first = {node["id"]: node["step"] for node in nodes.values() if node["depth"] == 1}
        children.update(first[node["parent"]] for node in nodes.values() if node["depth"] == 2)
        assert_all_released(engine)
    expected = weights(list(values.values()), 1.0) * sum(children.values())
    assert chisquare([children[s] for s in values], expected).pvalue > 0.01


def test_finished_particles_stay_in_the_pool_and_can_win():
    engine = engine_of(["\\boxed{7}", "b\n\nc\n\n\\boxed{2}", "b\n\nc\n\n\\boxed{2}", "b\n\nc\n\n\\boxed{2}"],
                       {"\\boxed{7}": 0.95, "\\boxed{2}": 0.4})
    result = run("particles", engine, n=4)
    finished = [node for node in nodes_of(result).values() if node["answer"] == "7"]
    assert len(finished) == 1 and finished[0]["status"] == "finished" and finished[0]["depth"] == 1
    assert result.answer == "7" and result.details["tree"]["chosen"][-1] == finished[0]["id"]
    assert_all_released(engine)


def test_particles_vote_counts_a_particle_as_often_as_it_is_carried():
    scripts, values = ["\\boxed{7}", "\\boxed{2}", "\\boxed{2}", "\\boxed{2}"], {"\\boxed{7}": 0.9, "\\boxed{2}": 0.6}
    best = run("particles", engine_of(scripts, values), n=4)
    voted = run("particles", engine_of(scripts, values), n=4, pick="vote")
    assert best.answer == "7" and best.votes == {"7": pytest.approx(0.9)}
    # Every particle finished in the first round; the pool of 4 holds copies, each voting with its value.
    carried = voted.votes.get("7", 0) / 0.9 + voted.votes.get("2", 0) / 0.6
    assert carried == pytest.approx(4)
    assert len(voted.branches) == len(voted.votes)  # one record per distinct particle


# ---- A* -----------------------------------------------------------------------------------------------------------

ASTAR_SCRIPTS = [
    "A\n\nz\n\n", "B\n\nz\n\n",  # the root's children
    "A\n\nA1\n\nz\n\n", "A\n\nA2\n\nz\n\n",  # A's
    "B\n\n\\boxed{5}", "B\n\nB2\n\nz\n\n",  # B's
]
ASTAR_VALUES = {"A\n\n": 0.6, "B\n\n": 0.5, "A1\n\n": 0.3, "A2\n\n": 0.4, "\\boxed{5}": 0.9, "B2\n\n": 0.2}


def test_astar_pops_in_f_order_and_stops_at_the_first_complete_solution():
    engine = engine_of(ASTAR_SCRIPTS, ASTAR_VALUES)
    result = run("astar", engine, n=2, step_cost=0.0)
    nodes = nodes_of(result)
    # f = 1 - value: A (0.4) first; then B (0.5) before A's children (0.6, 0.7); then B's solution (0.1).
    assert [nodes[i]["step"] for i in result.details["popped"]] == ["A\n\n", "B\n\n", "\\boxed{5}"]
    assert result.answer == "5" and [b.answer for b in result.branches] == ["5"]
    assert {nodes[i]["step"]: nodes[i]["status"] for i in nodes if nodes[i]["depth"] == 2} == {
        "A1\n\n": "open", "A2\n\n": "open", "\\boxed{5}": "finished", "B2\n\n": "open"}
    assert_all_released(engine)


def test_astar_step_cost_sends_the_search_back_to_shallower_nodes():
    values = {"A\n\n": 0.6, "B\n\n": 0.45, "A1\n\n": 0.65, "A2\n\n": 0.1, "\\boxed{5}": 0.9, "B2\n\n": 0.2}
    greedy = run("astar", engine_of(ASTAR_SCRIPTS, values), n=2, step_cost=0.0)
    costly = run("astar", engine_of(ASTAR_SCRIPTS, values), n=2, step_cost=0.3)
    steps = lambda result: [nodes_of(result)[i]["step"] for i in result.details["popped"]]  # noqa: E731
    assert steps(greedy)[:2] == ["A\n\n", "A1\n\n"]  # A1 (f 0.35) before B (0.55)
    assert steps(costly)[:2] == ["A\n\n", "B\n\n"]  # A1 costs 0.6 + 0.35, B 0.3 + 0.55


def test_astar_prunes_beyond_the_frontier_at_once():
    engine = engine_of(ASTAR_SCRIPTS, ASTAR_VALUES)
    result = run("astar", engine, n=2, step_cost=0.0, frontier=2)
    statuses = {node["step"]: node["status"] for node in nodes_of(result).values() if node["depth"] == 2}
    assert statuses["A1\n\n"] == "pruned"  # the worst of B, A1, A2 when A was expanded
    assert result.answer == "5"
    assert_all_released(engine)


# ---- every search -------------------------------------------------------------------------------------------------

SEARCHES = [("beam", {"n": 4, "m": 2}), ("dvts", {"n": 4, "m": 2}), ("particles", {"n": 4}), ("astar", {"n": 2})]


@pytest.mark.parametrize("strategy, size", SEARCHES)
@pytest.mark.parametrize("budget", [9, 25, 60])
def test_the_budget_caps_generated_plus_scored_tokens(strategy, size, budget):
    engine = engine_of(long_scripts(6, 8))
    result = run(strategy, engine, budget=budget, **size)
    assert result.usage.generated_tokens + result.usage.scored_tokens <= budget
    assert result.details["exhausted"]  # an unlimited run spends more than 60
    assert_all_released(engine)


@pytest.mark.parametrize("strategy, size", SEARCHES)
def test_the_budget_also_covers_the_probes(strategy, size):
    engine = engine_of(long_scripts(6, 8))
    result = run(strategy, engine, budget=400, scorer="probe", **size)
    assert 0 < result.usage.generated_tokens + result.usage.scored_tokens <= 400
    assert result.details["scorer_tokens"] > 0
    assert_all_released(engine)


@pytest.mark.parametrize("strategy, size, live_at_most", [
    ("beam", {"n": 4, "m": 2}, 4), ("dvts", {"n": 8, "m": 4}, 8), ("particles", {"n": 4}, 4),
    ("astar", {"n": 2, "frontier": 3}, 3 + 2)])
def test_dropped_nodes_are_released_at_once(monkeypatch, strategy, size, live_at_most):
    """Whenever a step is scored, the only live branches are the nodes the search still holds: the new steps (and
    A*'s open set). Parents are released once forked, pruned and finished nodes at once. (The logprob scorer holds
    no branches of its own.)"""
    engine = engine_of(long_scripts(8, 6))
    live = []
    original = LogprobScorer.score

    async def watched(self, question, partial):
        live.append(engine.stats().live_branches)
        return await original(self, question, partial)

    monkeypatch.setattr(LogprobScorer, "score", watched)
    result = run(strategy, engine, scorer="logprob", **size)
    assert len(live) > 3 * live_at_most and max(live) <= live_at_most
    assert result.answer is not None
    assert_all_released(engine)


@pytest.mark.parametrize("strategy, size", SEARCHES)
def test_children_share_their_parents_cells_and_nothing_is_evaluated_again(strategy, size):
    engine = engine_of(long_scripts(6, 3))
    result = run(strategy, engine, **size)
    generator = result.usage.models[GEN]
    assert generator["prompt_tokens"] == PROMPT_TOKENS  # only the prompt, once: every step continues a fork
    assert generator["prompt_tokens_shared"] >= PROMPT_TOKENS * (len(nodes_of(result)) - 1)  # a fork per node
    assert result.usage.models[JUDGE]["scored_tokens"] == 2 * (len(nodes_of(result)) - 1)  # every node once
    assert_all_released(engine)


@pytest.mark.parametrize("strategy, size", SEARCHES)
def test_max_steps_ends_the_search_with_solutions_cut_short(strategy, size):
    engine = engine_of(long_scripts(6, 8))
    result = run(strategy, engine, max_steps=2, **size)
    assert max(node["depth"] for node in nodes_of(result).values()) <= 2
    assert result.answer is None and all(b.finish_reason == "length" for b in result.branches)
    assert_all_released(engine)


@pytest.mark.parametrize("strategy, options, message", [
    ("beam", {"n": 2, "m": 4}, "1 <= m <= n"),
    ("dvts", {"n": 4, "m": 0}, "1 <= m <= n"),
    ("particles", {"n": 4, "weight_temperature": 0}, "weight_temperature"),
    ("astar", {"n": 4, "frontier": 2}, "frontier"),
    ("beam", {"n": 4, "aggregate": "mean"}, "unknown aggregation 'mean'"),
    ("beam", {"n": 4, "pick": "random"}, "unknown pick 'random'"),
    ("dvts", {"n": 4, "scorer": "oracle"}, "unknown scorer 'oracle'"),
    ("particles", {"n": 4, "budget": 0}, "budget must be at least 1"),
])
def test_bad_options_are_clear_errors(strategy, options, message):
    with pytest.raises(PonderError, match=message):
        run(strategy, engine_of(["a"]), **options)
