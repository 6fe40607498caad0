"""Replay: run a strategy on the branches a finished ``ponder bench`` run recorded, instead of on the model.

Adaptive-Consistency, short-m@k, first-finish and weighted votes only decide *which* samples to draw, when to stop
and how to vote; the samples themselves are self-consistency's: independent draws from the model at the same sampling
settings. Replaying the branches an SC run recorded therefore runs the real strategy code -- its stopping rules, its
cancellations, its budget -- on genuine samples, in seconds instead of the hour a live run takes on a CPU. Branch
``i`` of a replay is the ``i``-th branch recorded, as branch ``i`` of a live run is seeded like SC's branch ``i``; a
live run's texts are still not bit-identical to the recording, because llama.cpp's logits shift slightly with the
composition of the decode batch, so a replay and a live run agree in distribution, not sample for sample.

``ReplayEngine`` plays branch ``i`` of a question back as the ``i``-th recorded branch of that problem, its text cut
into exactly as many tokens as the branch generated, one token per step, all live branches in lockstep (as a batched
engine decodes them), so a cancelled branch is charged the tokens it had generated when it was cancelled. Every token
carries the branch's recorded mean logprob, so mean-logprob weightings (``logprob``, ``rpc``) see what the live run
saw. What a replay cannot do, it refuses: per-token confidences (DeepConf, self-certainty) and ``score`` on the
generating model (the ``self`` verifier) were not recorded; more branches than recorded; sampling parameters other
than the recording's.

Wall time: replaying a token takes microseconds, so a replay's clock is the real clock plus the recorded run's seconds
per generated token (its wall time over its generated tokens) for every token replayed. A replay's "wall s per
problem" is then what its tokens would have taken at the recorded run's throughput -- the convention ``ponder report``
uses for maj@k -- plus whatever really ran, such as a verifier: ``bon`` with ``verifier=program`` or a ``judge`` model
replays the candidates and runs its verifier for real.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.base import Branch, PonderError, SamplingParams, StopIf
from ..engine.fake import FakeBranch, FakeEngine, Script
from ..prompts import math_messages
from .datasets import Dataset
from .metrics import summarize
from .runner import read_results

# Sampling fields that a replay may differ in: they only switch on extra per-token records.
_RECORDING_ONLY = ("logprobs", "top_logprobs", "seed")


@dataclass
class RecordedScript(Script):
    """A recorded branch: its text split into exactly ``generated_tokens`` pieces."""

    pieces: list[str] = field(default_factory=list)

    def tokens(self) -> list[str]:
        return self.pieces


def split_text(text: str, count: int) -> list[str]:
    """``text`` as ``count`` pieces that join back to it: whole words where there are enough, else characters,
    else empty pieces (a recorded branch can end in tokens that detokenize to nothing)."""
    if count < 1:
        return []
    units = re.findall(r"\S+\s*|\s+", text)
    if len(units) < count:
        units = list(text)
    if len(units) <= count:
        return units + [""] * (count - len(units))
    # More units than tokens: cut into ``count`` runs of nearly equal length.
    bounds = [round(i * len(units) / count) for i in range(count + 1)]
    return ["".join(units[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Recording:
    problem: str  # its id
    prompt_tokens: int
    branches: list[dict]  # the recorded branch summaries, in creation order


class ReplayEngine(FakeEngine):
    def __init__(self, source: str | Path, dataset: Dataset):
        header, records = read_results(source)
        if not records:
            raise PonderError(f"{source} has no finished problems to replay")
        if header["dataset"]["sha256"] != dataset.sha256:
            raise PonderError(f"{source} was recorded on {header['dataset']['name']} "
                              f"(sha256 {header['dataset']['sha256'][:12]}…), not on {dataset.name}; replay it "
                              "with the same --data")
        super().__init__([], name=header["model"]["name"])
        self.model.path, self.model.sha256 = header["model"]["path"], header["model"]["sha256"]
        self.source = Path(source)
        self.header = header
        self.recorded_n = header["config"]["n"]
        recorded_params = header["config"]["params"]
        self.params = SamplingParams(**{**recorded_params, "stop": tuple(recorded_params["stop"])})
        cut_short = sorted({b["finish_reason"] for r in records for b in r["branches"]} - {"stop", "length"})
        if cut_short:
            raise PonderError(f"{source} has branches that did not end on their own ({', '.join(cut_short)}): "
                              "replay a run that let every branch finish, such as sc")
        by_id = {r["id"]: r for r in records}
        # The key is what ``open`` sees: the prompt text of the problem's question.
        self._recordings = {
            self._prompt_text(math_messages(p.question)):
                Recording(p.id, by_id[p.id]["usage"]["prompt_tokens"], by_id[p.id]["branches"])
            for p in dataset.problems if p.id in by_id}
        self.problems = {r.problem for r in self._recordings.values()}
        recorded = summarize(header["strategy"], records)
        self.seconds_per_token = recorded.wall_s / recorded.generated_tokens if recorded.generated_tokens else 0.0
        self._forked: dict[int, int] = {}  # id(root) -> recorded branches handed out so far

    def description(self) -> dict:
        """What the results header records about the replay (its identity: a replay of another file is another
        run)."""
        return {"source": str(self.source), "sha256": hashlib.sha256(self.source.read_bytes()).hexdigest(),
                "strategy": self.header["strategy"], "n": self.recorded_n,
                "seconds_per_token": round(self.seconds_per_token, 6)}

    def check(self, params: SamplingParams, n: int, seed: int) -> None:
        """Refuse a configuration the recording cannot answer, before any problem runs."""
        if seed != self.header["config"]["seed"]:
            raise PonderError(f"{self.source} was recorded with --seed {self.header['config']['seed']}; a replay "
                              f"samples as it did, so use that seed (got {seed})")
        differ = [f"{name} {getattr(params, name)!r} (recorded {getattr(self.params, name)!r})"
                  for name in vars(self.params) if name not in _RECORDING_ONLY
                  and getattr(params, name) != getattr(self.params, name)]
        if differ:
            raise PonderError(f"a replay must sample as {self.source} did; these differ: {', '.join(differ)}")
        if n > self.recorded_n:
            raise PonderError(f"{self.source} recorded {self.recorded_n} branches per problem; --n {n} needs more")

    def now(self) -> float:
        """The replay clock: real time plus the recorded run's time for every token replayed so far."""
        return time.time() + self._counters.generated_tokens * self.seconds_per_token

    def _prompt_tokens(self, text: str) -> int:
        recording = self._recordings.get(text)
        if recording is None:
            raise PonderError(f"{self.source} has no recording of this prompt: a replay can only run the problems "
                              "of the recorded run, and only strategies that sample answers (no verifier prompts)")
        return recording.prompt_tokens

    def _scripts_for(self, branch: FakeBranch, n: int) -> list[Script]:
        recording = self._recordings[branch.prompt]
        start = self._forked.get(id(branch), 0)
        if start + n > len(recording.branches):
            raise PonderError(f"problem {recording.problem}: the strategy asked for branch {start + n}, but "
                              f"{self.source} recorded {len(recording.branches)}")
        self._forked[id(branch)] = start + n
        return [RecordedScript(b["text"], logprobs=[b["mean_logprob"] or 0.0] * b["generated_tokens"],
                               pieces=split_text(b["text"], b["generated_tokens"]))
                for b in recording.branches[start:start + n]]

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        if params.top_logprobs:
            raise PonderError("a replay has no per-token confidences (the recording kept token logprobs only); "
                              "strategies and weightings that read them (deepconf, self-certainty) must run live")
        if params.logprobs and not self.params.logprobs:
            raise PonderError(f"{self.source} was recorded without log-probabilities; strategies and weightings "
                              "that read them (logprob, rpc) need a recording made with --record-logprobs")
        return await super().extend(branch, params, stop_if)

    async def score(self, branch: Branch, continuation: str) -> float:
        raise PonderError("a replay cannot score text on the generating model (it is not loaded): run verifier=self "
                          "live, or replay with verifier=program or a judge model")

    def release(self, branch: Branch) -> None:
        super().release(branch)
        self._forked.pop(id(branch), None)
