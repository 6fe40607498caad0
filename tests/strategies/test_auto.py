"""``auto`` on the fake engine and the real sandbox: agreement stops at two branches, disagreement escalates, budgets
hold, a failed program is no vote, unavailable models fall back with a note; the profile round-trips and a bad one
is one line."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from ponder import models, options
from ponder.cli import build_parser, main, summary_line
from ponder.engine.base import PonderError, SamplingParams
from ponder.probes import ProbeError
from ponder.strategies import auto_profile as profiles
from ponder.strategies.auto_profile import SHIPPED, Arm, Policy, Profile, load_profile
from ponder.server.config import ServerConfig
from ponder.server.schemas import ChatCompletionRequest
from ponder.server.strategy_call import plan_call
from ponder.strategies import STRATEGIES

from kind_engine import KindEngine, make_profile, program
from seven_probe import install_seven_probe, knows_seven


@pytest.fixture
def profile_file(tmp_path):
    def write(**medium) -> str:
        path = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}.json"
        make_profile(medium.pop("model", ""), **medium).save(path)
        return str(path)
    return write


def run(engine, profile_path, **options):
    return asyncio.run(STRATEGIES["auto"](engine, "What is 6 times 7?", n=8, params=SamplingParams(), seed=0,
                                          profile=profile_path, **options))


def test_agreement_stops_at_two_branches(profile_file):
    engine = KindEngine([program("print(6 * 7)\n")], ["6 times 7 is \\boxed{42}"])
    result = run(engine, profile_file())
    assert result.answer == "42" and result.votes == {"42": 2}
    assert len(result.branches) == 2 and result.details["stopped"] == "agreed" and result.details["waves"] == 1
    assert [b.details["arm"] for b in result.branches] == ["reasoning-greedy", "program-greedy"]
    assert result.branches[1].details["status"] == "ok" and result.branches[1].details["kind"] == "program"
    assert "note" not in result.details
    assert engine.stats().live_branches == 0


def test_disagreement_escalates_until_the_margin(profile_file):
    engine = KindEngine([program("print(41)\n"), program("print(42)\n")],
                        ["\\boxed{42}", "\\boxed{43}", "\\boxed{42}"])
    result = run(engine, profile_file())
    assert result.answer == "42"
    assert result.details["stopped"] == "margin" and result.details["waves"] == 3
    arms = result.details["arms"]
    assert arms["reasoning-greedy"]["answers"] == ["42"] and arms["program-greedy"]["answers"] == ["41"]
    assert arms["reasoning-sampled"]["answers"] == ["43", "42"]
    assert result.votes["42"] - max(v for a, v in result.votes.items() if a != "42") >= 2
    assert engine.stats().live_branches == 0


def test_a_failed_program_is_no_vote(profile_file):
    engine = KindEngine([program("print(1 / 0)\n")], ["\\boxed{42}"])
    result = run(engine, profile_file(), max_branches=2)
    assert result.details["stopped"] == "max branches"  # one vote: the opening did not agree
    assert result.answer == "42" and result.votes == {"42": 1}
    assert result.branches[1].details["status"] == "ZeroDivisionError" and result.branches[1].answer is None
    # without the cap, it escalates: the failed program's 'disagreement' buys more branches
    engine = KindEngine([program("print(1 / 0)\n")], ["\\boxed{42}"])
    result = run(engine, profile_file())
    assert len(result.branches) > 2 and result.answer == "42"


@pytest.fixture
def seven_probe(tmp_path, monkeypatch):
    install_seven_probe(tmp_path, monkeypatch)


def split_engine() -> KindEngine:
    """Four branches, four answers: the greedy pair 5 and 8, then 7 (reasoning) and 9 (program)."""
    return KindEngine([program("print(8)\n"), program("print(9)\n")], ["\\boxed{5}", "\\boxed{7}"],
                      hidden_fn=knows_seven)


def test_a_full_split_at_the_cap_is_answered_by_the_probes_pick_of_the_reasoning_branches(profile_file, seven_probe):
    path = profile_file(max_branches=4)
    voted = run(split_engine(), path, tiebreak="vote")
    assert voted.details["stopped"] == "max branches" and voted.answer == "5"  # a four-way tie: the first answer
    assert voted.details["tiebreak"] == {"by": "vote"}
    probed = run(split_engine(), path)  # the default where the model has a probe
    assert probed.answer == "7" and probed.votes == voted.votes  # the vote is reported as it was
    assert probed.details["tiebreak"]["by"] == "probe"
    scores = probed.details["tiebreak"]["scores"]
    assert [s["answer"] for s in scores] == ["5", "7"] and scores[1]["score"] > 0.9 > 0.1 > scores[0]["score"]
    assert probed.usage.scored_tokens == 0  # the hidden states were kept as the branches decoded
    assert "votes: 5 ×1, 8 ×1, 7 ×1, 9 ×1 · tie broken by the probe · " in summary_line(probed)
    assert "tie broken" not in summary_line(voted)


def test_the_probe_does_not_overrule_a_leader_without_the_margin(profile_file, seven_probe):
    engine = KindEngine([program("print(8)\n")], ["\\boxed{5}", "\\boxed{7}"], hidden_fn=knows_seven)
    result = run(engine, profile_file(max_branches=4))  # 8 twice (the programs), 5 and 7 once: 8 leads by 1 < 2
    assert result.details["stopped"] == "max branches" and result.answer == "8"
    assert result.details["tiebreak"]["by"] == "vote" and len(result.details["tiebreak"]["scores"]) == 2


def test_break_tie_decides_only_a_full_split_or_a_tie_for_the_lead():
    from ponder.answers import vote
    from ponder.strategies.auto import break_tie

    scores = {0: 0.3, 2: 0.8}  # voters 0 and 2 are scored (reasoning), the others not (programs)
    assert break_tie(vote(["5", "8", "7"]), scores) == "7"  # a full split
    assert break_tie(vote(["5", "8", "7", "5"]), scores) is None  # 5 leads
    assert break_tie(vote(["5", "8", "7", "7", "5"]), scores) == "7"  # 5 and 7 tie; 8 is out of it
    assert break_tie(vote(["5", "8", "7", "8", "5"]), scores) == "5"  # the best scored voter of a tied answer
    assert break_tie(vote(["5", "8", "7", "8", "5"], [1, 1, 1, 1, 1.5]), scores) is None  # weights break the tie
    assert break_tie(vote(["5", "8", "8", "5"]), {1: 0.9}) == "8"
    assert break_tie(vote(["5", "8"]), {}) is None  # nothing scored: the vote stands
    assert break_tie(vote(["5", "8", "7"]), {0: 0.5, 2: 0.5}) == "5"  # equal scores: the first voter


def test_a_settled_run_ignores_the_tiebreak(profile_file, seven_probe):
    engine = KindEngine([program("print(6 * 7)\n")], ["6 times 7 is \\boxed{42}"], hidden_fn=knows_seven)
    result = run(engine, profile_file(), tiebreak="probe")
    assert result.answer == "42" and result.details["stopped"] == "agreed" and "tiebreak" not in result.details


def test_the_logprob_tiebreak_picks_the_likeliest_reasoning_branch(profile_file):
    result = run(split_engine(), profile_file(max_branches=4), tiebreak="logprob")
    reasoning = [b for b in result.branches if b.details["kind"] == "reasoning"]
    assert result.answer == max(reasoning, key=lambda b: b.mean_logprob).answer
    assert len(result.details["tiebreak"]["scores"]) == 2


def test_without_a_probe_the_default_tiebreak_is_the_vote(profile_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_PROBES", str(tmp_path))  # no probe for the fake model there
    result = run(split_engine(), profile_file(max_branches=4))
    assert result.answer == "5" and result.details["tiebreak"] == {"by": "vote"}


def test_a_probe_tiebreak_without_a_probe_or_with_a_bad_name_is_one_line(profile_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_PROBES", str(tmp_path))
    with pytest.raises(ProbeError, match="no correctness probe for fake"):
        run(split_engine(), profile_file(), tiebreak="probe")
    with pytest.raises(PonderError, match="tiebreak must be one of vote, probe, logprob, got 'best'"):
        run(split_engine(), profile_file(), tiebreak="best")


def test_the_low_effort_answers_from_the_opening_and_high_goes_further(profile_file):
    path = profile_file()
    low = run(KindEngine([program("print(41)\n")], ["\\boxed{42}"]), path, effort="low")
    assert len(low.branches) == 2 and low.details["stopped"] == "max branches" and low.details["effort"] == "low"
    assert low.answer == "42"  # a tie goes to the first opening arm, the reasoning
    high = run(KindEngine([program("print(41)\n")], ["\\boxed{42}"]), path, effort="high")
    assert len(high.branches) == 10 and high.details["stopped"] == "max branches"
    with pytest.raises(PonderError, match="effort must be one of low, medium, high"):
        run(KindEngine([program("print(41)\n")], ["\\boxed{42}"]), path, effort="max")


def test_the_token_budget_holds(profile_file):
    engine = KindEngine([program("print(41)\n")], ["so " * 30 + "\\boxed{42}"])
    result = run(engine, profile_file(), budget=50)
    assert result.usage.generated_tokens <= 50
    assert result.details["stopped"] == "token budget"


def test_the_time_budget_holds(profile_file):
    long = "word " * 200_000 + "\\boxed{42}"
    engine = KindEngine([program("print(42)\n")], [long])
    started = time.perf_counter()
    result = run(engine, profile_file(), budget_s=0.3)
    assert time.perf_counter() - started < 2.0
    assert result.details["stopped"] == "time budget"
    assert result.answer == "42"  # the program finished in time and votes
    assert engine.stats().live_branches == 0


def test_arms_fall_back_to_the_engines_model_with_a_note(profile_file):
    engine = KindEngine([program("print(42)\n")], ["\\boxed{42}"])
    result = run(engine, profile_file(model="qwen2.5-1.5b"))
    assert result.answer == "42" and result.details["stopped"] == "agreed"
    assert result.details["note"].startswith("qwen2.5-1.5b is not available here")
    assert result.details["note"].endswith("its arms ran on fake") and result.details["note"].count("available") == 1
    assert result.details["models"] == {"reasoning-greedy": "fake", "program-greedy": "fake"}


def test_arms_run_on_another_model_of_the_engine(tmp_path):
    engine = KindEngine([program("print(42)\n")], ["\\boxed{7}"], models={"large": ["\\boxed{42}"]})
    path = make_profile("large").save(tmp_path / "p.json")
    result = run(engine, str(path))
    assert result.answer == "42" and result.details["stopped"] == "agreed"
    assert set(result.usage.models) == {"large"} and "note" not in result.details
    assert result.details["models"] == {"reasoning-greedy": "large", "program-greedy": "large"}


def test_the_profile_round_trips(tmp_path):
    profile = make_profile()
    path = profile.save(tmp_path / "p.json")
    again = Profile.read(path)
    assert again.to_dict() == profile.to_dict()
    assert again.arms == profile.arms and again.policies == profile.policies
    assert again.step_s("fake", 1) == 0.01 and again.step_s("fake", 2) == 0.015 and again.step_s("fake", 4) == 0.03


def test_the_shipped_profile_loads_and_names_the_bundled_large_model():
    shipped = Profile.read(SHIPPED)
    assert shipped.models() == ["qwen2.5-1.5b"]
    assert set(shipped.policies) == {"low", "medium", "high"}
    assert shipped.tuned["figures"]["medium"]["tuning"]["accuracy"] > 0.5


def test_which_profile_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PONDER_PROFILE", raising=False)
    assert profiles.profile_path() == SHIPPED
    tuned = make_profile().save(profiles.tuned_path())
    assert profiles.profile_path() == tuned
    monkeypatch.setenv("PONDER_PROFILE", str(tmp_path / "env.json"))
    assert profiles.profile_path() == tmp_path / "env.json"
    assert profiles.profile_path("given.json") == profiles.Path("given.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"name": "x"}', 'is not a ponder profile (no "ponder_profile" field)'),
    ('{"ponder_profile": 2}', "has format 2; this ponder reads format 1: rerun ponder tune"),
    ('{"ponder_profile": 1, "arms": []}', "is malformed: missing field 'policies'"),
])
def test_a_bad_profile_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PonderError) as raised:
        load_profile(str(path))
    assert message in str(raised.value) and str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_profile_naming_an_undefined_arm_or_lacking_an_effort_is_one_line(tmp_path):
    data = make_profile().to_dict()
    data["policies"]["medium"]["then"] = ["telepathy"]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(PonderError, match="names arm 'telepathy', which the profile does not define"):
        Profile.read(tmp_path / "a.json")
    data = make_profile().to_dict()
    del data["policies"]["high"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(PonderError, match="has no policy for effort 'high'"):
        Profile.read(tmp_path / "b.json")


def test_ponder_ask_runs_auto_by_default_and_a_bad_profile_is_one_line(tmp_path, monkeypatch, capsys):
    engine = KindEngine([program("print(42)\n")], ["\\boxed{42}"])
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: engine)
    good = make_profile().save(tmp_path / "good.json")
    assert main(["ask", "What is 6 times 7?", "--option", f"profile={good}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["strategy"] == "auto" and result["details"]["stopped"] == "agreed"
    (tmp_path / "bad.json").write_text("[]")
    assert main(["ask", "What is 6 times 7?", "--option", f"profile={tmp_path / 'bad.json'}"]) == 2
    err = capsys.readouterr().err
    assert "is not a ponder profile" in err and err.count("\n") == 1


def test_ponder_ask_loads_the_profiles_model_when_none_is_named(monkeypatch, tmp_path):
    asked = []

    def load_engine(model=None, **kwargs):
        asked.append(model)
        return KindEngine([program("print(4)\n")], ["\\boxed{4}"], name=model or "qwen2.5-0.5b")

    monkeypatch.setattr(options, "load_engine", load_engine)
    path = make_profile("qwen2.5-1.5b").save(tmp_path / "p.json")
    monkeypatch.setattr(models, "status", lambda model: SimpleNamespace(installed=True))
    assert main(["ask", "What is 2+2?", "--option", f"profile={path}"]) == 0
    assert asked == ["qwen2.5-1.5b"]
    monkeypatch.setattr(models, "status", lambda model: SimpleNamespace(installed=False))
    assert main(["ask", "What is 2+2?", "--option", f"profile={path}"]) == 0
    assert asked[-1] is None  # not installed: the bundled default, on which the arms run (with a note)
    assert main(["ask", "What is 2+2?", "--strategy", "sc", "--n", "1"]) == 0
    assert asked[-1] is None  # other strategies keep the bundled default


def test_reasoning_effort_over_http_sets_the_effort():
    def call(**fields):
        request = ChatCompletionRequest(model="fake", messages=[{"role": "user", "content": "What is 2+2?"}],
                                        **fields)
        return plan_call(request, "fake", ServerConfig(default_strategy="auto"))

    serve = build_parser().parse_args(["serve"])
    assert serve.strategy == "auto"
    assert call(reasoning_effort="high").options["effort"] == "high"
    assert call(reasoning_effort="minimal").options["effort"] == "low"
    assert "effort" not in call().options
    assert "effort" not in call(reasoning_effort="high", ponder={"strategy": "sc"}).options  # sc has no effort
    from ponder.server.schemas import ApiError

    with pytest.raises(ApiError, match="conflicting effort"):
        call(reasoning_effort="high", ponder={"effort": "low"})


@pytest.mark.model
def test_auto_on_the_bundled_model(real_engine, tmp_path):
    path = make_profile().save(tmp_path / "p.json")  # arms on the engine's own model (the 0.5B)
    result = asyncio.run(STRATEGIES["auto"](real_engine, "What is 6 times 7?", n=1,
                                            params=SamplingParams(max_tokens=96), seed=0, profile=str(path)))
    assert result.details["stopped"] in ("agreed", "margin", "max branches")
    assert [b.details["arm"] for b in result.branches][:2] == ["reasoning-greedy", "program-greedy"]
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert real_engine.stats().live_branches == 0


def test_the_python_api_runs_auto_on_the_profiles_model_by_default(monkeypatch, tmp_path):
    import ponder

    asked = []

    def load_engine(model=None, **kwargs):
        asked.append(model)
        return KindEngine([program("print(4)\n")], ["\\boxed{4}"], name=model or "qwen2.5-0.5b")

    monkeypatch.setattr(ponder, "load_engine", load_engine)
    monkeypatch.setattr(ponder, "_engines", {})
    monkeypatch.setattr(models, "status", lambda model: SimpleNamespace(installed=True))
    path = make_profile("qwen2.5-1.5b").save(tmp_path / "p.json")
    result = ponder.ask("What is 2+2?", profile=str(path))
    assert result.strategy == "auto" and result.answer == "4"
    assert asked == ["qwen2.5-1.5b"]
    ponder.ask("What is 2+2?", "sc", n=1)
    assert asked[-1] is None  # other strategies keep the bundled default
