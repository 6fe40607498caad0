"""Early exit on the fake engine: answer probes (agreeing window, run-length convergence), the loop cut, the option
syntax, accounting, and the strategies that take ``early_exit``."""

from __future__ import annotations

import asyncio
import itertools
from typing import Callable

import pytest

from ponder.answers import extract_answer
from ponder.engine.base import PonderError, PromptTooLongError, SamplingParams, Usage
from ponder.engine.fake import FakeEngine, Script, fake_tokens
from ponder.stopping import (PROBE, AgreeingProbes, ConvergingProbes, EarlyExit, LoopCut, Probe, probed_answer)
from ponder.strategies import adaptive, cascade, deepconf, sc

PROBE_WORDS = len(fake_tokens(PROBE))


class ProbedFake(FakeEngine):
    """The fake engine, with scripted probe replies: ``reply(text)`` is what a probe of a branch whose text is
    ``text`` answers after the probe (its words are the reply's tokens). A probe's fork takes no sample script."""

    def __init__(self, scripts, reply: Callable[[str], str], **options):
        super().__init__(scripts, **options)
        self.reply = reply
        self.probe_texts: list[str] = []  # the text of each probed branch, in order

    async def fork(self, branch, n):
        model = self.models[branch.model]
        cursor = model.next_script
        children = await super().fork(branch, n)
        if branch.script is not None:  # a sampled branch forked: a probe, which must not take a sample's script
            model.next_script = cursor
        return children

    async def append(self, branch, text):
        probed = branch.text
        await super().append(branch, text)
        if text == PROBE:
            self.probe_texts.append(probed)
            # The script plays from the branch's length: fill up to it, then the reply.
            branch.script = Script("x " * len(branch.tokens) + self.reply(probed))
        return branch


def words(n: int, end: str = "") -> str:
    return " ".join(f"w{i}" for i in range(n)) + end


def run_sc(engine, n=1, max_tokens=512, **options):
    return asyncio.run(sc.STRATEGY(engine, "q", n=n, params=SamplingParams(max_tokens=max_tokens), seed=0, **options))


def test_probes_fire_every_p_tokens_and_their_forks_are_released():
    engine = ProbedFake([words(50, " \\boxed{7}")], reply=lambda text: "}")  # an empty answer never settles
    result = run_sc(engine, early_exit="probe:every=10")
    (branch,) = result.branches
    # The probe at 50 was released unanswered when the branch ended during the next chunk.
    assert [p["at"] for p in branch.details["early_exit"]["probes"]] == [10, 20, 30, 40]
    assert all(p["answer"] is None for p in branch.details["early_exit"]["probes"])
    assert "exit" not in branch.details["early_exit"]
    assert branch.finish_reason == "stop" and branch.answer == "7" and branch.generated_tokens == 51
    assert engine.stats().live_branches == 0


def test_an_agreeing_run_stops_the_branch_with_the_probed_answer():
    engine = ProbedFake([words(100, " \\boxed{5}")], reply=lambda text: "72}\n\\]")
    result = run_sc(engine, n=2, early_exit="probe:every=10,window=3")
    assert result.answer == "72" and result.votes == {"72": 2}
    for branch in result.branches:
        assert branch.finish_reason == "stop" and branch.answer == "72"
        assert branch.details["early_exit"]["exit"] == "probe"
        assert [p["at"] for p in branch.details["early_exit"]["probes"]] == [10, 20, 30]
        # The branch went on decoding while its third probe ran, and halted as soon as that probe settled.
        assert 30 < branch.generated_tokens <= 40
        assert branch.text.endswith("**Final Answer:**\n\\[ \\boxed{72} \\]")
        assert "</think>" not in branch.text  # not a thinking branch
    assert engine.stats().live_branches == 0


def test_probe_tokens_are_counted_apart_from_generated_tokens():
    engine = ProbedFake([words(100)], reply=lambda text: "72}")
    result = run_sc(engine, n=2, early_exit="probe:every=10")
    assert result.usage.probe_tokens == 2 * 3 * (PROBE_WORDS + 1)  # 3 probes per branch: the probe text + "72}"
    assert result.usage.generated_tokens == sum(b.generated_tokens for b in result.branches)
    assert result.usage.to_dict()["probe_tokens"] == result.usage.probe_tokens
    assert result.usage.models["fake"]["probe_tokens"] == result.usage.probe_tokens


@pytest.mark.parametrize("reply", ["72} wait", "72}\n\\]\nHmm", "72} but"])
def test_a_hesitation_word_in_a_probe_reply_blocks_the_stop(reply):
    engine = ProbedFake([words(60, " \\boxed{5}")], reply=lambda text: reply)
    (branch,) = run_sc(engine, early_exit="probe:every=10").branches
    assert branch.answer == "5" and branch.generated_tokens == 61
    assert "exit" not in branch.details["early_exit"]
    assert all(p["hesitant"] and p["answer"] == "72" for p in branch.details["early_exit"]["probes"])


def test_disagreeing_probes_do_not_stop_the_branch():
    answers = itertools.cycle(["0}", "1}"])
    engine = ProbedFake([words(60, " \\boxed{5}")], reply=lambda text: next(answers))
    (branch,) = run_sc(engine, early_exit="probe:every=5").branches
    assert branch.answer == "5" and "exit" not in branch.details["early_exit"]


def test_a_branch_that_ends_first_keeps_its_own_answer():
    engine = ProbedFake([words(25, " \\boxed{5}")], reply=lambda text: "72}")  # 2 probes, then the end
    (branch,) = run_sc(engine, early_exit="probe:every=10,window=3").branches
    assert branch.answer == "5" and branch.finish_reason == "stop"
    assert engine.stats().live_branches == 0


def test_probes_settle_on_equivalent_answers():
    answers = iter(["0.5}", "1/2}", "\\frac{1}{2}}"])
    engine = ProbedFake([words(100)], reply=lambda text: next(answers))
    (branch,) = run_sc(engine, early_exit="probe:every=10").branches
    assert branch.details["early_exit"]["exit"] == "probe" and branch.answer == "\\frac{1}{2}"


def test_max_tokens_holds_across_chunks_and_a_late_probe_can_still_settle():
    engine = ProbedFake([words(100)], reply=lambda text: "9}")
    (cut,) = run_sc(engine, max_tokens=25, early_exit="probe:every=10,window=5").branches
    assert cut.finish_reason == "length" and cut.generated_tokens == 25
    engine = ProbedFake([words(100)], reply=lambda text: "9}")
    (settled,) = run_sc(engine, max_tokens=30, early_exit="probe:every=10,window=2").branches
    assert settled.details["early_exit"]["exit"] == "probe" and settled.answer == "9"
    assert settled.generated_tokens <= 30


def test_an_exit_inside_the_thinking_closes_it():
    async def go(prompt: str):
        engine = ProbedFake([words(100, " \\boxed{3}")], reply=lambda text: "72}")
        root = await engine.open(prompt)
        (branch,) = await root.fork(1)
        early_exit = EarlyExit.parse("probe:every=10,window=2")
        await early_exit.extend(branch, SamplingParams())
        return branch, early_exit.details(branch)

    thinking, details = asyncio.run(go("Q <think>\n"))
    assert details["exit"] == "probe"
    assert "\n</think>\n\n**Final Answer:**\n\\[ \\boxed{72} \\]" in thinking.text
    assert extract_answer(thinking.text) == "72"
    closed, _ = asyncio.run(go("Q <think> earlier thoughts </think>"))
    assert "</think>" not in closed.text


def test_a_probe_that_does_not_fit_in_the_context_is_skipped():
    class FullContext(ProbedFake):
        async def append(self, branch, text):
            if text == PROBE:
                raise PromptTooLongError("appending the probe does not fit")
            return await super().append(branch, text)

    engine = FullContext([words(30, " \\boxed{5}")], reply=lambda text: "1}")
    (branch,) = run_sc(engine, early_exit="probe:every=10").branches
    assert branch.answer == "5" and branch.details["early_exit"]["probes"] == []
    assert engine.stats().live_branches == 0


def test_probes_refuse_stop_strings():
    async def go():
        engine = ProbedFake([words(10)], reply=lambda text: "1}")
        (branch,) = await (await engine.open("q")).fork(1)
        await EarlyExit.parse("probe").extend(branch, SamplingParams(stop=("\n",)))

    with pytest.raises(PonderError, match="cannot watch stop strings"):
        asyncio.run(go())


def test_the_token_budget_still_caps_generated_tokens():
    engine = ProbedFake([words(100)], reply=lambda text: "}")
    result = run_sc(engine, n=3, budget=47, early_exit="probe:every=10")
    assert result.usage.generated_tokens <= 47
    assert engine.stats().live_branches == 0


def test_cancelling_a_branch_while_its_probe_runs_releases_both():
    agreeing = [words(9, " \\boxed{1}")] * 4  # the vote settles after 10 tokens, while the long branch is probed
    engine = ProbedFake(agreeing + [words(200)], reply=lambda text: f"{len(engine.probe_texts)} and on}}")
    result = asyncio.run(adaptive.STRATEGY(engine, "q", n=5, params=SamplingParams(), seed=0, init=5,
                                      early_exit="probe:every=3"))
    assert result.answer == "1"
    cancelled = [b for b in result.branches if b.finish_reason == "cancelled"]
    assert len(cancelled) == 1 and len(cancelled[0].details["early_exit"]["probes"]) >= 2
    assert engine.stats().live_branches == 0


# ---- the rules on their own --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, answer", [
    ("72}", "72"), (" 72 }\n\\]", "72"), ("\\frac{1}{2}} done", "\\frac{1}{2}"), ("}", None), ("72", None),
    ("\\frac{1}{2", None),
])
def test_the_probed_answer_is_the_text_up_to_the_first_unmatched_brace(reply, answer):
    assert probed_answer(reply) == answer


def probes(*answers, hesitant=()) -> list[Probe]:
    return [Probe(10 * i, a, i in hesitant) for i, a in enumerate(answers)]


def test_agreeing_probes_need_a_full_window_of_confident_equal_answers():
    rule = AgreeingProbes(window=3)
    assert rule.settled(probes("1", "2", "2", "2")) == "2"
    assert rule.settled(probes("2", "2")) is None
    assert rule.settled(probes("2", None, "2")) is None
    assert rule.settled(probes("2", "2", "2", hesitant={1})) is None
    assert rule.settled(probes("3", "2", "2")) is None


@pytest.mark.parametrize("answers, settles", [
    (["5"] * 5, False),  # held from the first probe: p = 1/2, 0.5 ** 4 = 0.0625
    (["5"] * 6, True),  # 0.5 ** 5 = 0.031
    (["1", "2", "3", "5", "5", "5"], True),  # three changes in three: p = 4/5, 0.2 ** 2 = 0.04
    (["1", "2", "5", "5", "5"], False),  # p = 3/4, 0.25 ** 2 = 0.0625
    (["1", "2", "5", "5", "5", "5"], True),  # 0.25 ** 3
    (["1", "2", "3", "4", "5", "5"], False),  # a run of 2 is below min_run whatever its probability
    (["5"] * 5 + [None], False),  # an empty answer ends any run
])
def test_converging_probes_stop_on_a_run_that_jumps_out_of_the_history(answers, settles):
    assert (ConvergingProbes(min_run=3, alpha=0.05).settled(probes(*answers)) is not None) is settles


def test_converge_runs_through_a_strategy():
    engine = ProbedFake([words(200)], reply=lambda text: "4}")
    (branch,) = run_sc(engine, early_exit="converge:every=10").branches
    assert branch.details["early_exit"]["exit"] == "converge" and branch.answer == "4"
    assert len(branch.details["early_exit"]["probes"]) == 6


@pytest.mark.parametrize("text, block", [
    ("x" * 192, 1),
    ("The answer is 5. " * 12, 17),
    ("intro " + "abcdefghij" * 20, 10),
    ("a sentence of its own, long enough to pass the span once said three times. " * 3, 75),
])
def test_the_loop_cut_finds_the_repeated_block(text, block):
    assert LoopCut().period(text) == block


@pytest.mark.parametrize("text", [
    "x" * 191,  # shorter than the span
    "The answer is 5. " * 11,  # 187 characters
    " ".join(f"step {i} adds {i * 7} to the total" for i in range(40)),  # steps alike, never the same
    "a long enough sentence that repeats only twice is no loop at all, twice said. " * 2,
])
def test_the_loop_cut_leaves_text_that_does_not_loop(text):
    assert LoopCut().period(text) is None


def test_a_looping_branch_is_halted_marked_and_abstains():
    loop = "The answer is 2. " * 100
    engine = FakeEngine(["so \\boxed{1}", "hence \\boxed{1}", loop])
    result = run_sc(engine, n=3, early_exit="loop")
    looping = result.branches[2]
    assert looping.finish_reason == "halted" and looping.generated_tokens < 60
    assert looping.details == {"early_exit": {"exit": "loop", "block_chars": 17}}
    assert result.votes == {"1": 2}
    assert result.branches[0].details is None


def test_probe_and_loop_together():
    engine = ProbedFake(["The answer is 2. " * 100, words(100)], reply=lambda text: "}")
    result = run_sc(engine, n=2, early_exit="probe:every=10+loop")
    assert result.branches[0].details["early_exit"]["exit"] == "loop"
    assert result.branches[1].finish_reason == "stop" and "exit" not in result.branches[1].details["early_exit"]


# ---- the option ----------------------------------------------------------------------------------------------------

def test_the_option_syntax():
    both = EarlyExit.parse("probe+loop")
    assert isinstance(both.probes, AgreeingProbes) and isinstance(both.loop, LoopCut)
    tuned = EarlyExit.parse("probe:every=64, window=2 + loop:span=256")
    assert (tuned.probes.every, tuned.probes.window, tuned.probes.tokens, tuned.loop.span) == (64, 2, 20, 256)
    converge = EarlyExit.parse("converge:alpha=0.1,min_run=4")
    assert (converge.probes.alpha, converge.probes.min_run, converge.loop) == (0.1, 4, None)
    assert EarlyExit.parse("loop").probes is None


@pytest.mark.parametrize("spec, message", [
    ("stop-early", "unknown early_exit rule 'stop-early'"),
    ("probe+converge", "one probe rule"),
    ("probe:every=x", "every must be a whole number"),
    ("converge:alpha=high", "alpha must be a number"),
    ("probe:size=3", "KEY one of every, tokens, window"),
    ("loop:span", "expected KEY=VALUE"),
    ("probe:every=0", "at least 1"),
    ("loop:repeats=1", "at least 2"),
])
def test_a_bad_option_is_a_clear_error(spec, message):
    with pytest.raises(PonderError, match=message):
        EarlyExit.parse(spec)
    with pytest.raises(PonderError, match=message):
        run_sc(FakeEngine(["\\boxed{1}"]), early_exit=spec)


def test_adaptive_deepconf_and_cascade_take_the_option():
    def engine():
        return ProbedFake([words(100, " \\boxed{5}")], reply=lambda text: "6}")

    runs = {
        "adaptive": adaptive.STRATEGY(engine(), "q", n=4, params=SamplingParams(), seed=0, early_exit="probe:every=10"),
        "deepconf": deepconf.STRATEGY(engine(), "q", n=4, params=SamplingParams(), seed=0, warmup=2,
                                 early_exit="probe:every=10"),
    }
    for name, coroutine in runs.items():
        result = asyncio.run(coroutine)
        assert result.answer == "6" and result.config["early_exit"] == "probe:every=10", name
        assert all(b.details["early_exit"]["exit"] == "probe" for b in result.branches), name
        assert result.usage.probe_tokens > 0
    two_models = ProbedFake(["\\boxed{0}"], reply=lambda text: "6}", name="qwen2.5-0.5b",
                            models={"qwen2.5-1.5b": [words(100)]})
    two_models.models["qwen2.5-0.5b"].scripts = [Script(words(100, " \\boxed{5}"))]
    result = asyncio.run(cascade.STRATEGY(two_models, "q", params=SamplingParams(), seed=0, k=2,
                                     early_exit="probe:every=10"))
    assert result.answer == "6" and not result.details["escalated"]
    assert all(b.details["early_exit"]["exit"] == "probe" for b in result.branches)


def test_no_option_no_details_and_no_probe_tokens():
    result = run_sc(FakeEngine(["\\boxed{1}"]), n=2)
    assert all(b.details is None for b in result.branches)
    assert result.usage.probe_tokens == 0 and "probe_tokens" not in result.usage.to_dict()
    assert result.config["early_exit"] is None
    assert Usage().probe_tokens == 0
