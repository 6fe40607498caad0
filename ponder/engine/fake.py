"""A deterministic engine that plays scripted replies with the real Branch semantics, no model: the engine of the
strategy tests, and the base of replays of recorded runs (``ponder.bench.replay``, whose scripts are recorded branches),
so that a replay follows exactly the Branch semantics the tests pin down.

A fake model is a list of scripts: texts it would write, cut into "tokens" of one word each (with the whitespace that
follows it). ``FakeEngine(scripts)`` has one model (named ``name``); ``models={"large": [...]}`` adds more, each with
its own scripts, its own cursor over them and optionally its own ``score_fn`` (pass a ``FakeModel``). ``open(...,
model=NAME)`` opens a branch on a model (None: the default one; an unknown name is a ``PonderError``), and usage is
counted per model.

Which script a branch plays, and from where:

* every branch created by ``fork`` takes its model's next script in turn (cyclically); a root takes one the first time
  it is extended itself. So forks of one prompt are the model's different samples, as in self-consistency.
* a script plays from the branch's length: a branch holding ``k`` tokens after its prompt writes the script's token
  ``k`` next. ``append``-ed text counts like the model's own tokens, so it takes the place of as many script tokens
  as it has words: the script continues after it. Two models' scripts are thus aligned conversations -- what each
  model would write at each position -- and a test of a step-wise strategy reads like the exchange it scripts. A
  fork continues at its parent's length (in its own script).

``extend`` plays one token per step, yielding to the event loop between steps so that concurrent branches interleave the
way they do in a batched engine; the end of the script is end-of-generation (``finish_reason == "stop"`` without a stop
string). Stop strings, ``max_tokens`` and ``stop_if`` end an extend as on the real engines (``tokens.end_reason``).
``release`` ends an extend in flight with ``finish_reason == "cancelled"``. Per-token records are scripted too:
``logprobs`` (default -0.1), and with ``top_logprobs`` set, ``confidences`` (default 1.0), ``entropies`` (default 0.0
nats) and ``top_logprobs``, the alternatives kept in ``Branch.last_top_logprobs`` (default: the token alone, with its
logprob).

``score`` returns -0.1 per word of the continuation, or, when the branch's model has a ``score_fn``,
``score_fn(context, continuation)`` where ``context`` is the branch's prompt text followed by its text (so a test can
script a verifier's verdict per candidate, or a judge's per step). ``FakeEngine(..., can_score=False)`` plays an
engine that cannot score (a remote server without prompt logprobs): ``score`` raises ``ScoreUnsupportedError``.

``hidden`` returns ``hidden_fn(context)`` (same ``context`` as ``score_fn``) as a float32 vector, or by default a
deterministic vector of ``HIDDEN_SIZE`` numbers drawn from a hash of the context: a test scripts what a probe reads.
As on the real engine, an extend with ``hidden=True`` keeps the vector of the branch before each token it samples,
and the whole branch's when it ends at the end of its script: ``hidden()`` is then free, and otherwise counts one
``scored_tokens``; every read counts one ``hidden_states``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from .base import (Branch, Engine, EngineStats, Message, ModelInfo, PonderError, PromptTooLongError, SamplingParams,
                   ScoreUnsupportedError, StopIf, Usage)
from .tokens import end_reason, record_token

ScoreFn = Callable[[str, str], float]
HiddenFn = Callable[[str], Sequence[float]]
HIDDEN_SIZE = 8


def fake_tokens(text: str) -> list[str]:
    """The fake tokenizer: one token per word, with the whitespace that follows it."""
    return re.findall(r"\S+\s*|\s+", text)


@dataclass
class Script:
    text: str
    logprobs: list[float] = field(default_factory=list)  # per token; defaults to -0.1 each
    confidences: list[float] = field(default_factory=list)  # per token; defaults to 1.0 each
    entropies: list[float] = field(default_factory=list)  # per token (nats); defaults to 0.0 each
    top_logprobs: list[dict[str, float]] = field(default_factory=list)  # per token; defaults to the token alone

    def tokens(self) -> list[str]:
        return fake_tokens(self.text)


@dataclass
class FakeModel:
    """One model of the fake engine: its scripts, handed out in turn, and how it scores continuations."""

    scripts: list[Script]
    score_fn: ScoreFn | None = None
    next_script: int = 0  # the cursor: index of the script the next new branch takes

    def __post_init__(self):
        self.scripts = [s if isinstance(s, Script) else Script(s) for s in self.scripts]


ModelSpec = Sequence[str | Script] | FakeModel  # another model: its scripts, or a FakeModel to give it a score_fn


@dataclass(eq=False)
class FakeBranch(Branch):
    script: Script | None = None
    prompt: str = ""


def _scripted(records: list, i: int, default):
    return records[i] if i < len(records) else default


class FakeEngine(Engine):
    def __init__(self, scripts: Sequence[str | Script], *, kv_cells: int = 100_000, name: str = "fake",
                 score_fn: ScoreFn | None = None, models: Mapping[str, ModelSpec] | None = None,
                 can_score: bool = True, hidden_fn: HiddenFn | None = None):
        self.model = ModelInfo(name=name, path="", sha256="0" * 64)
        self.can_score = can_score
        self.hidden_fn = hidden_fn
        self.models = {name: FakeModel(list(scripts), score_fn)}
        for other, spec in (models or {}).items():
            self.models[other] = spec if isinstance(spec, FakeModel) else FakeModel(list(spec))
        self.kv_cells = kv_cells
        self._counters = EngineStats(kv_cells_total=kv_cells)
        self._live: set[FakeBranch] = set()

    @property
    def scripts(self) -> list[Script]:
        """The default model's scripts."""
        return self.models[self.model.name].scripts

    def _prompt_text(self, prompt: str | Sequence[Message]) -> str:
        return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        model = self.model.name if model is None else model
        if model not in self.models:
            raise PonderError(f"the fake engine has no model {model!r} (it has: {', '.join(self.models)})")
        text = self._prompt_text(prompt)
        n = self._prompt_tokens(text, model)
        if n > self.kv_cells:
            raise PromptTooLongError(f"prompt has {n} tokens; the context holds {self.kv_cells}")
        usage = usage if usage is not None else Usage()
        usage.add("prompt_tokens", n, model)
        self._counters.prefills += 1
        self._counters.prefill_tokens += n
        branch = FakeBranch(engine=self, usage=usage, context_tokens=n, prompt=text, model=model)
        self._live.add(branch)
        return branch

    def _prompt_tokens(self, text: str, model: str) -> int:
        """How many tokens the prompt ``text`` counts as on ``model``: one per word."""
        return len(text.split())

    def _scripts_for(self, branch: FakeBranch, n: int) -> list[Script]:
        """The scripts of ``n`` new branches of ``branch``'s model: the next ones in turn."""
        model = self.models[branch.model]
        if not model.scripts:
            raise PonderError(f"the fake model {branch.model!r} has no scripts to generate from")
        scripts = [model.scripts[(model.next_script + i) % len(model.scripts)] for i in range(n)]
        model.next_script += n
        return scripts

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        assert isinstance(branch, FakeBranch)
        children = []
        for script in self._scripts_for(branch, n):
            child = FakeBranch(engine=self, usage=branch.usage, context_tokens=branch.context_tokens, script=script,
                               prompt=branch.prompt, **branch.history())
            branch.usage.add("prompt_tokens_shared", branch.context_tokens, branch.model)
            self._live.add(child)
            children.append(child)
        return children

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        assert isinstance(branch, FakeBranch)
        if branch.script is None:
            (branch.script,) = self._scripts_for(branch, 1)
        script, tokens = branch.script, branch.script.tokens()
        start_text = len(branch.text)
        branch.finish_reason = branch.matched_stop = None
        for step in range(params.max_tokens):
            if branch.released:
                branch.finish_reason = "cancelled"
                return branch
            i = len(branch.tokens)  # the script plays from the branch's length (appended tokens included)
            if i >= len(tokens):
                branch.finish_reason = "stop"
                if params.hidden:  # the decode that sampled end-of-generation computed it
                    branch.hidden_state, branch.hidden_len = self._vector(branch), len(branch.tokens)
                return branch
            if params.hidden:  # as on the real engine, the decode that samples a token read the branch before it
                branch.hidden_state, branch.hidden_len = self._vector(branch), len(branch.tokens)
            branch.tokens.append(i)
            branch.text += tokens[i]
            branch.context_tokens += 1
            branch.usage.add("generated_tokens", 1, branch.model)
            self._counters.generated_tokens += 1
            logprob = _scripted(script.logprobs, i, -0.1)
            if params.top_logprobs:
                record_token(branch, logprob, _scripted(script.confidences, i, 1.0),
                             _scripted(script.entropies, i, 0.0))
                branch.last_top_logprobs = dict(_scripted(script.top_logprobs, i, None) or {tokens[i]: logprob})
            else:
                record_token(branch, logprob if params.logprobs else None, None, None)
            reason = end_reason(branch, params, stop_if, start_text, len(tokens[i]), params.max_tokens - step - 1)
            if reason is not None:
                branch.finish_reason = reason
                return branch
            await asyncio.sleep(0)  # one "decode step": let the other branches advance
        branch.finish_reason = "length"  # max_tokens 0: nothing to generate
        return branch

    async def score(self, branch: Branch, continuation: str) -> float:
        assert isinstance(branch, FakeBranch)
        if not self.can_score:
            raise ScoreUnsupportedError("this fake engine plays one that cannot score")
        n = len(continuation.split())
        branch.usage.add("scored_tokens", n, branch.model)
        score_fn = self.models[branch.model].score_fn
        if score_fn is not None:
            return score_fn(branch.prompt + branch.text, continuation)
        return -0.1 * n

    def _vector(self, branch: FakeBranch) -> np.ndarray:
        context = branch.prompt + branch.text
        if self.hidden_fn is not None:
            return np.asarray(self.hidden_fn(context), dtype=np.float32)
        seed = int.from_bytes(hashlib.sha256(context.encode()).digest()[:8], "big")
        return np.random.default_rng(seed).standard_normal(HIDDEN_SIZE).astype(np.float32)

    async def hidden(self, branch: Branch) -> np.ndarray:
        assert isinstance(branch, FakeBranch)
        branch.hidden_state, branch.hidden_len = self._vector(branch), len(branch.tokens)
        branch.usage.add("scored_tokens", 1, branch.model)
        branch.usage.add("hidden_states", 1, branch.model)
        return branch.hidden_state

    def model_info(self, name: str | None = None) -> ModelInfo:
        """The ModelInfo of model ``name`` (None: the default one); every fake model has the fake sha256."""
        return self.model if name in (None, self.model.name) else ModelInfo(name=name, path="", sha256="0" * 64)

    async def append(self, branch: Branch, text: str) -> Branch:
        assert isinstance(branch, FakeBranch)
        n = len(fake_tokens(text))
        branch.text += text
        branch.tokens.extend([-1] * n)
        branch.appended_tokens += n
        branch.context_tokens += n
        branch.usage.add("prompt_tokens", n, branch.model)
        return branch

    def release(self, branch: Branch) -> None:
        self._live.discard(branch)  # type: ignore[arg-type]

    def stats(self) -> EngineStats:
        return replace(self._counters, live_branches=len(self._live),
                       kv_cells_used=sum(b.context_tokens for b in self._live))
