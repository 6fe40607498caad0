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

Several recordings: ``--replay`` once per recording. The first file is the default model's run; a strategy that opens
another model (a cascade's large model) or another prompt (``mix`` opens ``pal``'s program prompt beside the reasoning
prompt) gets the branches of the file that recorded that model and prompt, checked against the sampling settings that
file was recorded with (a greedy run answers a greedy escalation). Which prompt a recording answered, and with which
settings, follows from its strategy's declaration (``Strategy.chat``, ``branch_params``, ``temperature``): ``pal``
asked for programs (its replies start inside the code block the strategy appended, and stop at the closing fence),
every other strategy the standard math prompt. A model that no file recorded (a judge) is loaded and
runs for real.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import Sequence

from ..engine.base import Branch, Engine, Message, PonderError, SamplingParams, StopIf, Usage
from ..engine.fake import FakeBranch, FakeEngine, Script
from ..models import load_engine
from ..strategies import STRATEGIES, Strategy
from .datasets import Dataset
from .metrics import summarize
from .runner import read_results, run_prompt

_WHOLE_BRANCHES_ONLY = ("a replay plays back whole recorded branches from their prompt; strategies that fork or add to a "
                        "partial solution (early_exit probes, step-wise and search strategies) must run live")

_NO_HIDDEN = ("a replay has no hidden states (no model is loaded): the probe verifier, weighting and step scorer must "
              "run live; `ponder probe eval` measures them on recorded branches")

# What a replay assumes of a recording whose strategy this ponder no longer has: it opened the run's math prompt and
# sampled with the settings as given (the declaration's defaults).
_FORMER_STRATEGY = Strategy("former", run=None, summary="a strategy this ponder no longer has", family="vote")

# Sampling fields that a replay may differ in: they only switch on extra per-token records.
_RECORDING_ONLY = ("logprobs", "top_logprobs", "seed", "hidden")


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


@dataclass
class Recorded:
    """One recorded run: its file, header, sampling settings and branches by prompt text."""

    source: Path
    header: dict
    params: SamplingParams  # the recorded command line's sampling settings
    extend_params: SamplingParams  # what the recorded strategy sampled with (pal adds its closing fence as a stop)
    n: int
    recordings: dict[str, Recording]  # the prompt text ``open`` sees -> the problem's recording
    seconds_per_token: float

    @classmethod
    def read(cls, source: str | Path, dataset: Dataset, prompt_text) -> Recorded:
        header, records = read_results(source)
        if not records:
            raise PonderError(f"{source} has no finished problems to replay")
        if header["dataset"]["sha256"] != dataset.sha256:
            raise PonderError(f"{source} was recorded on {header['dataset']['name']} "
                              f"(sha256 {header['dataset']['sha256'][:12]}…), not on {dataset.name}; replay it "
                              "with the same --data")
        cut_short = sorted({b["finish_reason"] for r in records for b in r["branches"]} - {"stop", "length"})
        if cut_short:
            raise PonderError(f"{source} has branches that did not end on their own ({', '.join(cut_short)}): "
                              "replay a run that let every branch finish, such as sc or greedy")
        strategy = STRATEGIES.get(header["strategy"], _FORMER_STRATEGY)
        recorded_params = header["config"]["params"]
        if strategy.temperature is not None:  # greedy samples at temperature 0 whatever --temperature said
            recorded_params = {**recorded_params, "temperature": strategy.temperature}
        prompt = run_prompt(header)
        params = SamplingParams(**{**recorded_params, "stop": tuple(recorded_params["stop"])})
        by_id = {r["id"]: r for r in records}
        recorded = summarize(header["strategy"], records)
        return cls(
            source=Path(source), header=header, params=params, extend_params=strategy.branch_params(params),
            n=header["config"]["n"],
            recordings={prompt_text(strategy.chat(p.question, prompt)):
                        Recording(p.id, by_id[p.id]["usage"]["prompt_tokens"], by_id[p.id]["branches"])
                        for p in dataset.problems if p.id in by_id},
            seconds_per_token=recorded.wall_s / recorded.generated_tokens if recorded.generated_tokens else 0.0)

    @property
    def model(self) -> str:
        return self.header["model"]["name"]

    def differences(self, params: SamplingParams, *, extending: bool = False) -> list[str]:
        """The sampling settings in which ``params`` differ from the recorded command line's or, ``extending``, from
        what the recorded strategy extended its branches with (max_tokens aside: a shorter extend replays a prefix)."""
        recorded = self.extend_params if extending else self.params
        ignored = (*_RECORDING_ONLY, "max_tokens") if extending else _RECORDING_ONLY
        return [f"{name} {getattr(params, name)!r} (recorded {getattr(recorded, name)!r})"
                for name in vars(recorded) if name not in ignored and getattr(params, name) != getattr(recorded, name)]


class ReplayEngine(FakeEngine):
    """Plays back ``sources``: the first is the default model's run; each further file is another model's run (e.g.
    the large model's greedy run for a cascade's escalations) or the same model's run of another prompt (``pal``'s
    programs beside ``sc``'s reasoning, for ``mix``)."""

    def __init__(self, sources: str | Path | list[str | Path], dataset: Dataset):
        sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
        self.runs = [Recorded.read(source, dataset, self._prompt_text) for source in sources]
        self._run_of: dict[tuple[str, str], Recorded] = {}  # (model, prompt text) -> the run that recorded it
        for run in self.runs:
            for prompt in run.recordings:
                other = self._run_of.setdefault((run.model, prompt), run)
                if other is not run:
                    raise PonderError(f"{other.source} and {run.source} both recorded {run.model} on the same "
                                      "prompts; give one recording per model and prompt")
        default = self.runs[0]
        super().__init__([], name=default.model,
                         models={run.model: [] for run in self.runs[1:] if run.model != default.model})
        self.model.path, self.model.sha256 = default.header["model"]["path"], default.header["model"]["sha256"]
        self.source = default.source
        self.header = default.header
        self.recorded_n = default.n
        self.problems = {r.problem for r in default.recordings.values()}
        self._generated = {run.source: 0 for run in self.runs}  # tokens replayed per recording, for the clock
        self._forked: dict[int, int] = {}  # id(root) -> recorded branches handed out so far
        self._live_engine: Engine | None = None  # the models no file recorded (a judge), run for real

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        if model is None or model in self.models:
            return await super().open(prompt, usage, model=model)
        # A model without a recording runs for real; its branches belong to that engine from here on.
        if self._live_engine is None:
            self._live_engine = load_engine(model)
        return await self._live_engine.open(prompt, usage, model=model)

    def close(self) -> None:
        if self._live_engine is not None:
            self._live_engine.close()

    def description(self) -> dict:
        """What the results header records about the replay (its identity: a replay of other files is another
        run)."""
        described = [{"source": str(run.source), "sha256": hashlib.sha256(run.source.read_bytes()).hexdigest(),
                      "model": run.model, "strategy": run.header["strategy"], "n": run.n,
                      "seconds_per_token": round(run.seconds_per_token, 6)} for run in self.runs]
        return {**described[0], **({"other_recordings": described[1:]} if len(described) > 1 else {})}

    def check(self, params: SamplingParams, n: int, seed: int) -> None:
        """Refuse a configuration the default recording cannot answer, before any problem runs."""
        if seed != self.header["config"]["seed"]:
            raise PonderError(f"{self.source} was recorded with --seed {self.header['config']['seed']}; a replay "
                              f"samples as it did, so use that seed (got {seed})")
        differ = self.runs[0].differences(params)
        if differ:
            raise PonderError(f"a replay must sample as {self.source} did; these differ: {', '.join(differ)}")
        if n > self.recorded_n:
            raise PonderError(f"{self.source} recorded {self.recorded_n} branches per problem; --n {n} needs more")

    def now(self) -> float:
        """The replay clock: real time plus, for every token replayed so far, its recording's seconds per token."""
        return time.time() + sum(self._generated[run.source] * run.seconds_per_token for run in self.runs)

    def _recorded(self, prompt: str, model: str) -> Recorded:
        run = self._run_of.get((model, prompt))
        if run is None:
            sources = ", ".join(str(r.source) for r in self.runs if r.model == model)
            raise PonderError(f"{sources} recorded no such prompt on {model}: a replay can only run the problems of "
                              "the recorded runs, on the prompts they recorded (the same --system and "
                              "--prompt-template; sampled answers, not verifier prompts)")
        return run

    def _prompt_tokens(self, text: str, model: str) -> int:
        return self._recorded(text, model).recordings[text].prompt_tokens

    def _scripts_for(self, branch: FakeBranch, n: int) -> list[Script]:
        run = self._recorded(branch.prompt, branch.model)
        recording = run.recordings[branch.prompt]
        start = self._forked.get(id(branch), 0)
        if start + n > len(recording.branches):
            raise PonderError(f"problem {recording.problem}: the strategy asked for branch {start + n} of "
                              f"{run.model}, but {run.source} recorded {len(recording.branches)}")
        self._forked[id(branch)] = start + n
        # A recorded text starts with what the strategy appended to the prompt (pal's opening of the code block);
        # the fake engine plays a script from the branch's length, so those appended tokens are skipped pieces.
        appended, skipped = branch.text, [""] * len(branch.tokens)
        scripts = []
        for b in recording.branches[start:start + n]:
            if not b["text"].startswith(appended):
                raise PonderError(f"problem {recording.problem}: {run.source} recorded replies that do not start "
                                  f"with the text the strategy appended ({appended!r})")
            scripts.append(RecordedScript(
                b["text"], logprobs=[0.0] * len(skipped) + [b["mean_logprob"] or 0.0] * b["generated_tokens"],
                pieces=skipped + split_text(b["text"][len(appended):], b["generated_tokens"])))
        return scripts

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        run = self._recorded(branch.prompt, branch.model)
        if params.top_logprobs:
            raise PonderError("a replay has no per-token confidences (the recording kept token logprobs only); "
                              "strategies and weightings that read them (deepconf, self-certainty) must run live")
        if params.hidden:
            raise PonderError(_NO_HIDDEN)
        if params.logprobs and not run.params.logprobs:
            raise PonderError(f"{run.source} was recorded without log-probabilities; strategies and weightings "
                              "that read them (logprob, rpc) need a recording made with --record-logprobs")
        differ = run.differences(params, extending=True)
        if differ:
            raise PonderError(f"the strategy samples {run.model} otherwise than {run.source} recorded: "
                              f"{', '.join(differ)}")
        before = len(branch.tokens)
        try:
            return await super().extend(branch, params, stop_if)
        finally:
            self._generated[run.source] += len(branch.tokens) - before

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        if len(branch.tokens) > branch.appended_tokens:  # only a prompt (and what was appended to it) is forked
            raise PonderError(_WHOLE_BRANCHES_ONLY)
        return await super().fork(branch, n)

    async def append(self, branch: Branch, text: str) -> Branch:
        if len(branch.tokens) > branch.appended_tokens:  # text after generated tokens: a partial solution
            raise PonderError(_WHOLE_BRANCHES_ONLY)
        return await super().append(branch, text)

    async def score(self, branch: Branch, continuation: str) -> float:
        raise PonderError("a replay cannot score text (no model is loaded): run verifiers that read a model "
                          "(self, judge) live, or replay with verifier=program")

    async def hidden(self, branch: Branch):
        raise PonderError(_NO_HIDDEN)

    def release(self, branch: Branch) -> None:
        super().release(branch)
        self._forked.pop(id(branch), None)
