"""Correctness probes on the fake engine: hidden states (free or one token), the probe file, its uses (bon's
verifier, sc's and mix's weighting, the search scorer), and ``ponder probe train`` end to end on a tiny fixture."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from ponder.cli import main
from ponder.engine.base import SamplingParams, Usage
from ponder.engine.fake import HIDDEN_SIZE, FakeEngine
from ponder.probes import Probe, ProbeError, kept_score, probe_score
from ponder.search.scorers import get_scorer
from ponder.strategies import STRATEGIES

from seven_probe import FAKE_SHA, install_seven_probe, knows_seven

RIGHT, WRONG = "so \\boxed{7}", "so \\boxed{8}"


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    """A probe for the fake model that trusts answers of 7, found through $PONDER_PROBES."""
    return install_seven_probe(tmp_path, monkeypatch)


def run(coro):
    return asyncio.run(coro)


# ---- hidden states -------------------------------------------------------------------------------------------------

def test_fake_hidden_state_is_free_after_an_extend_that_kept_it_and_one_token_otherwise():
    engine = FakeEngine(["two words"])

    async def go():
        usage = Usage()
        root = await engine.open("q", usage)
        kept, plain = await root.fork(2)
        await kept.extend(SamplingParams(hidden=True))
        await plain.extend(SamplingParams())
        free = await kept.hidden()
        scored = usage.scored_tokens
        paid = await plain.hidden()
        again = await plain.hidden()
        return free, paid, again, scored, usage

    free, paid, again, scored_after_free, usage = run(go())
    assert scored_after_free == 0 and usage.scored_tokens == 1  # only the read that was not kept cost a token
    assert usage.hidden_states == 3 and usage.to_dict()["hidden_states"] == 3
    assert free.dtype == np.float32 and free.shape == (HIDDEN_SIZE,)
    assert np.array_equal(free, paid) and np.array_equal(paid, again)  # same text, same deterministic vector


def test_forks_inherit_a_kept_hidden_state_and_appends_make_it_stale():
    engine = FakeEngine(["a b"], hidden_fn=lambda ctx: [float(len(ctx)), 0.0])

    async def go():
        root = await engine.open("q")
        (b,) = await root.fork(1)
        await b.extend(SamplingParams(hidden=True))
        (child,) = await b.fork(1)
        inherited = child.hidden_state is b.hidden_state and child.hidden_len == b.hidden_len
        await child.append(" c")
        return inherited, await b.hidden(), await child.hidden()

    inherited, parent, child = run(go())
    assert inherited and child[0] == parent[0] + 2


# ---- the probe file ------------------------------------------------------------------------------------------------

def test_probe_file_round_trips_and_refuses_another_model(tmp_path):
    probe = Probe("m", "a" * 64, np.array([0.5, -1.25, 3e-7]), 0.1, trained={"C": 0.01})
    path = probe.save(tmp_path)
    assert path.name == "a" * 64 + ".json" and path.stat().st_size < 2000
    loaded = Probe.load(path, "a" * 64)
    assert np.allclose(loaded.weights, probe.weights) and loaded.bias == 0.1 and loaded.trained == {"C": 0.01}
    assert loaded.score([1.0, 0.0, 0.0]) == pytest.approx(1 / (1 + np.exp(-0.6)))
    with pytest.raises(ProbeError, match="is a probe for m .*not for the model"):
        Probe.load(path, "b" * 64)


@pytest.mark.parametrize("content, says", [
    ("{not json", "not readable JSON"),
    ('{"ponder_probe": 1, "model": "m", "sha256": "x", "hidden_size": 3, "bias": 0}', "missing field 'weights'"),
    ('{"ponder_probe": 1, "model": "m", "sha256": "x", "hidden_size": 3, "bias": 0, "weights": [1, 2]}',
     "not 3 finite numbers"),
    ('{"something": "else"}', "not a ponder probe"),
])
def test_a_bad_probe_file_is_one_clear_line(tmp_path, content, says):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProbeError) as caught:
        Probe.load(path)
    assert says in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_shipped_probe_stops_bon_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / f"{FAKE_SHA}.json").write_text("[]")
    monkeypatch.setenv("PONDER_PROBES", str(tmp_path))
    engine = FakeEngine([RIGHT])
    with pytest.raises(ProbeError, match="is not a valid probe file"):
        run(STRATEGIES["bon"](engine, "q", n=2, verifier="probe"))


def test_no_probe_for_the_model_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_PROBES", str(tmp_path))
    engine = FakeEngine([RIGHT])

    async def go():
        (b,) = await (await engine.open("q")).fork(1)
        await b.extend(SamplingParams())
        return await probe_score(b)

    with pytest.raises(ProbeError, match="no correctness probe for fake .*ponder probe train"):
        run(go())


# ---- the uses ------------------------------------------------------------------------------------------------------

def test_bon_with_the_probe_verifier_picks_what_the_probe_trusts_for_free(probe_dir):
    engine = FakeEngine([WRONG, WRONG, RIGHT], hidden_fn=knows_seven)
    result = run(STRATEGIES["bon"](engine, "q", n=3, verifier="probe"))
    assert result.answer == "7"
    assert result.usage.scored_tokens == 0 and result.usage.hidden_states == 3  # sampled with hidden=True
    assert result.config["verifier"] == "probe"


def test_sc_probe_weighting_outvotes_the_majority(probe_dir):
    majority = run(STRATEGIES["sc"](FakeEngine([WRONG, WRONG, RIGHT], hidden_fn=knows_seven), "q", n=3))
    weighted = run(STRATEGIES["sc"](FakeEngine([WRONG, WRONG, RIGHT], hidden_fn=knows_seven), "q", n=3,
                                    weighting="probe"))
    assert majority.answer == "8" and weighted.answer == "7"
    assert weighted.config["hidden"] is True and weighted.usage.scored_tokens == 0
    assert weighted.votes["7"] > weighted.votes["8"]


def test_probe_weight_without_a_kept_state_is_no_evidence(probe_dir):
    engine = FakeEngine([RIGHT], hidden_fn=knows_seven)

    async def go():
        (b,) = await (await engine.open("q")).fork(1)
        await b.extend(SamplingParams())
        return kept_score(b), STRATEGIES["sc"].run.__globals__["get_weighting"]("probe").weigh([b])

    kept, weights = run(go())
    assert kept is None and weights == [0.5]


def test_mix_takes_the_probe_weighting(probe_dir):
    from kind_engine import KindEngine, program

    engine = KindEngine([program("print(8)\n")], [RIGHT])
    engine.hidden_fn = knows_seven
    majority = asyncio.run(STRATEGIES["mix"](engine, "q", n=3, program_share=0.67, seed=0))
    weighted = asyncio.run(STRATEGIES["mix"](engine, "q", n=3, program_share=0.67, seed=0, weighting="probe"))
    assert majority.answer == "8" and weighted.answer == "7" and weighted.config["weighting"] == "probe"


def test_hidden_step_scorer_reads_the_probe(probe_dir):
    engine = FakeEngine([RIGHT], hidden_fn=knows_seven)

    class Node:
        parent = None
        step = RIGHT
        tokens = 2
        steps = [RIGHT]

    async def go():
        usage = Usage()
        (b,) = await (await engine.open("q", usage)).fork(1)
        await b.extend(SamplingParams(stop=("}",)))
        node = Node()
        node.branch = b
        scorer = get_scorer("hidden", engine=engine, usage=usage)
        return await scorer.score("q", node), scorer.reserve, usage.scored_tokens

    value, reserve, scored = run(go())
    assert value == pytest.approx(1 / (1 + np.exp(-2.5))) and reserve == 1 and scored == 1


def test_a_search_runs_with_the_hidden_scorer(probe_dir):
    scripts = ["step one\n\nso \\boxed{7}", "step two\n\nso \\boxed{8}"]
    engine = FakeEngine(scripts, hidden_fn=knows_seven)
    result = run(STRATEGIES["beam"](engine, "q", n=2, m=1, params=SamplingParams(), seed=0, scorer="hidden"))
    assert result.answer == "7"
    assert engine.stats().live_branches == 0


def test_replay_refuses_hidden_states():
    from ponder.bench.replay import _NO_HIDDEN

    assert "no hidden states" in _NO_HIDDEN


# ---- ponder probe train on a tiny fixture --------------------------------------------------------------------------

def write_fixture(tmp_path: Path, problems: int = 30, per: int = 4) -> Path:
    data = tmp_path / "tiny.jsonl"
    results = tmp_path / "tiny-sc.jsonl"
    rng = np.random.default_rng(0)
    lines = [json.dumps({"ponder_results": 1, "ponder_version": "0", "created": "x", "strategy": "sc",
                         "config": {"n": per, "seed": 0, "params": vars(SamplingParams()) | {"stop": []},
                                    "options": {}},
                         "model": {"name": "fake", "sha256": FAKE_SHA, "path": ""},
                         "dataset": {"name": "tiny", "source": str(data), "sha256": "x", "problems": problems},
                         "scoring": "test"})]
    with data.open("w") as f:
        for p in range(problems):
            f.write(json.dumps({"id": f"t-{p}", "question": f"what is {p}?", "answer": str(p)}) + "\n")
            branches = []
            for i in range(per):
                right = bool(rng.random() < 0.5)
                answer = str(p) if right else str(p + 1)
                branches.append({"text": f"think {i} \\boxed{{{answer}}}", "answer": answer, "correct": right,
                                 "generated_tokens": 3, "finish_reason": "stop", "mean_logprob": -0.1})
            lines.append(json.dumps({"id": f"t-{p}", "gold": str(p), "prediction": None, "correct": False,
                                     "branches": branches, "usage": {}, "wall_s": 1.0}))
    results.write_text("\n".join(lines) + "\n")
    return results


def test_probe_train_end_to_end(tmp_path, monkeypatch, capsys):
    results = write_fixture(tmp_path)

    def hidden_fn(context: str) -> list[float]:
        # right answers are "question number == boxed number": noisy evidence in the first coordinate
        question = int(context.split("what is ")[1].split("?")[0])
        right = f"boxed{{{question}}}" in context
        noise = np.random.default_rng(len(context)).standard_normal(HIDDEN_SIZE) * 0.3
        return list(noise + np.eye(HIDDEN_SIZE)[0] * (1.0 if right else -1.0))

    monkeypatch.setattr("ponder.models.load_engine", lambda *a, **k: FakeEngine(["x"], name="fake",
                                                                                 hidden_fn=hidden_fn))
    out, report = tmp_path / "probes", tmp_path / "report.json"
    argv = ["probe", "train", str(results), "--per-problem", "4", "--folds", "3", "--cache", str(tmp_path / "c"),
            "--out", str(out), "--report", str(report)]
    assert main(argv) == 0
    figures = json.loads(report.read_text())["held_out"]["all"]
    assert figures["problems"] == 30 and figures["branches"] == 120
    assert figures["auroc"]["probe"] > 0.95 and figures["pick_accuracy"]["probe"] > 0.9
    probe = Probe.load(out / f"{FAKE_SHA}.json", FAKE_SHA)
    assert probe.trained["command"].startswith("ponder probe train ") and probe.trained["branches"] == 120
    # a rerun reads nothing again: every vector is in the cache
    monkeypatch.setattr("ponder.models.load_engine", lambda *a, **k: pytest.fail("the cache was not used"))
    assert main(argv + ["--no-save"]) == 0
