"""DeepConf on the fake engine: the threshold from the warm-up, mid-decode cancellation, confidence-weighted votes."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, Script
from ponder.strategies import deepconf


def trace(answer: str, confidences: list[float]) -> Script:
    words = ["step"] * (len(confidences) - 1) + [f"\\boxed{{{answer}}}"]
    return Script(" ".join(words), confidences=confidences)


class ReleaseLog(FakeEngine):
    """Records how many tokens the engine had generated when each branch was released."""

    def __init__(self, scripts):
        super().__init__(scripts)
        self.released_at: dict[int, int] = {}  # generated tokens of the dropping branch -> engine total then

    def release(self, branch):
        if branch.finish_reason == "halted":
            self.released_at[len(branch.tokens)] = self.stats().generated_tokens
        super().release(branch)


def run(engine, **options):
    return asyncio.run(deepconf.STRATEGY(engine, "q", params=SamplingParams(), seed=0, **options))


def test_online_cancels_the_branch_whose_window_confidence_drops_at_that_step_and_frees_it():
    engine = ReleaseLog([
        trace("42", [5.0] * 10),  # warm-up: lowest group 5.0
        trace("41", [4.0] * 10),  # warm-up: lowest group 4.0 -> threshold (keep=100) = 4.0; the vote is split
        trace("42", [5, 5, 5, 5, 5, 1, 1, 1, 1, 1, 1, 1]),  # window (5, 5, 1, 1) = 3.0 < 4 after token 7
        trace("42", [5.0] * 30),  # runs on after the other is cancelled
    ])
    result = run(engine, n=4, warmup=2, step=2, keep=100, window=4)
    assert [b.finish_reason for b in result.branches] == ["stop", "stop", "halted", "stop"]
    halted = result.branches[2]
    assert halted.generated_tokens == 7
    # its KV cells were freed at once: within one decode step (the sibling had 7 or 8 tokens then, 30 in the end)
    assert engine.released_at[7] in (10 + 10 + 7 + 7, 10 + 10 + 7 + 8)
    assert result.config["threshold"] == 4.0
    assert result.votes == pytest.approx({"42": 10.0, "41": 4.0})  # the cancelled trace does not vote
    assert result.usage.generated_tokens == 10 + 10 + 7 + 30  # the cancelled tokens are counted
    assert engine.stats().live_branches == 0


def test_online_threshold_is_a_percentile_of_the_warmup_and_low_warmups_do_not_vote():
    engine = FakeEngine([trace("1", [5.0] * 4), trace("2", [1.0] * 4), trace("1", [3.0] * 4), trace("1", [4.0] * 4)])
    result = run(engine, n=4, warmup=4, keep=50, window=2)  # threshold = median of 5, 1, 3, 4 = 3.5
    assert result.config["threshold"] == 3.5
    assert result.votes == {"1": 9.0}  # the 1.0 and 3.0 traces fall below it
    assert len(result.branches) == 4


def test_online_stops_adding_branches_once_the_weighted_vote_is_settled():
    engine = FakeEngine([trace("7", [5.0] * 5)])
    result = run(engine, n=16, warmup=4)
    assert len(result.branches) == 4  # the warm-up agreed: consensus 100 %
    assert result.answer == "7"


def test_online_one_confident_warmup_trace_is_not_a_consensus():
    # keep=10: only the most confident warm-up trace clears the threshold; sampling goes on until two voters agree
    engine = FakeEngine([trace("7", [5.0] * 4), trace("8", [1.0] * 4), trace("9", [2.0] * 4), trace("8", [1.5] * 4),
                         trace("7", [6.0] * 4)])
    result = run(engine, n=16, warmup=4, keep=10, step=1, window=2)
    assert len(result.branches) == 5
    assert result.votes == {"7": 11.0}


def test_online_confidence_needs_top_logprobs_and_sets_them():
    result = run(FakeEngine([trace("7", [5.0] * 5)]), n=4, warmup=4)
    assert result.config["top_logprobs"] == 20


def test_offline_keeps_the_most_confident_traces_and_weights_their_votes():
    engine = FakeEngine([trace("1", [1.0] * 6), trace("1", [1.5] * 6), trace("2", [3.0] * 6), trace("1", [1.2] * 6)])
    kept_half = run(engine, n=4, mode="offline", keep=50, window=3)
    assert kept_half.votes == {"2": 3.0, "1": 1.5}
    assert kept_half.answer == "2"
    everything = run(FakeEngine(engine.scripts), n=4, mode="offline", keep=100, window=3)
    assert everything.votes == pytest.approx({"1": 1.0 + 1.5 + 1.2, "2": 3.0})
    assert everything.answer == "1"


def test_offline_tail_metric_reads_the_last_window():
    # lowest group of the first trace is low early on, but its tail is the most confident
    engine = FakeEngine([trace("1", [0.5, 0.5, 9, 9]), trace("2", [3.0] * 4)])
    assert run(engine, n=2, mode="offline", keep=50, window=2, metric="lowest-group").answer == "2"
    assert run(FakeEngine(engine.scripts), n=2, mode="offline", keep=50, window=2, metric="tail").answer == "1"


@pytest.mark.parametrize("options, message", [
    ({"mode": "sometimes"}, "mode"), ({"metric": "mean"}, "metric"), ({"keep": 0}, "keep"), ({"window": 0}, "window"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(PonderError, match=message):
        run(FakeEngine(["x"]), n=2, **options)
