"""A deterministic engine for tests of strategy logic: no model, scripted answers, the real Branch semantics.

Every branch created by ``fork`` takes the next script in turn (cyclically), and ``extend`` plays it back one word per
"token", one token per step, yielding to the event loop between steps so that concurrent branches interleave the way
they do in a batched engine. ``release`` ends an extend in flight with ``finish_reason == "cancelled"``.

``score`` returns -0.1 per word of the continuation, or, when the engine has a ``score_fn``, ``score_fn(context,
continuation)`` where ``context`` is the branch's prompt text followed by its generated text (so a test can script a
verifier's verdict per candidate).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .base import (Branch, Engine, EngineStats, Message, ModelInfo, PonderError, PromptTooLongError, SamplingParams,
                   StopIf, Usage)


@dataclass
class Script:
    text: str
    logprobs: list[float] = field(default_factory=list)  # per token; defaults to -0.1 each
    confidences: list[float] = field(default_factory=list)  # per token; defaults to 1.0 each

    def tokens(self) -> list[str]:
        return re.findall(r"\S+\s*|\s+", self.text)


@dataclass(eq=False)
class FakeBranch(Branch):
    script: Script | None = None
    position: int = 0  # next token of the script to play
    prompt: str = ""


class FakeEngine(Engine):
    def __init__(self, scripts: Sequence[str | Script], *, kv_cells: int = 100_000, name: str = "fake",
                 score_fn: Callable[[str, str], float] | None = None):
        self.scripts = [s if isinstance(s, Script) else Script(s) for s in scripts]
        self.score_fn = score_fn
        self.model = ModelInfo(name=name, path="", sha256="0" * 64)
        self.kv_cells = kv_cells
        self._counters = EngineStats(kv_cells_total=kv_cells)
        self._next_script = 0
        self._live: set[FakeBranch] = set()

    def _prompt_text(self, prompt: str | Sequence[Message]) -> str:
        return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        if model is not None and model != self.model.name:
            raise PonderError(f"the fake engine serves only {self.model.name!r}, not {model!r}")
        text = self._prompt_text(prompt)
        n = self._prompt_tokens(text)
        if n > self.kv_cells:
            raise PromptTooLongError(f"prompt has {n} tokens; the context holds {self.kv_cells}")
        usage = usage if usage is not None else Usage()
        usage.add("prompt_tokens", n, self.model.name)
        self._counters.prefills += 1
        self._counters.prefill_tokens += n
        branch = FakeBranch(engine=self, usage=usage, context_tokens=n, prompt=text, model=self.model.name)
        self._live.add(branch)
        return branch

    def _prompt_tokens(self, text: str) -> int:
        """How many tokens the prompt ``text`` counts as: one per word."""
        return len(text.split())

    def _scripts_for(self, branch: FakeBranch, n: int) -> list[Script]:
        """The scripts of ``n`` new forks of ``branch``: the next ones in turn."""
        scripts = [self.scripts[(self._next_script + i) % len(self.scripts)] for i in range(n)]
        self._next_script += n
        return scripts

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        assert isinstance(branch, FakeBranch)
        children = []
        for script in self._scripts_for(branch, n):
            child = FakeBranch(engine=self, usage=branch.usage, context_tokens=branch.context_tokens, script=script,
                               prompt=branch.prompt, model=branch.model)
            branch.usage.add("prompt_tokens_shared", branch.context_tokens, branch.model)
            self._live.add(child)
            children.append(child)
        return children

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        assert isinstance(branch, FakeBranch)
        if branch.script is None:
            raise PonderError("the fake engine only extends forked branches")
        tokens = branch.script.tokens()
        start_text = len(branch.text)
        branch.finish_reason = None
        for step in range(params.max_tokens):
            if branch.released:
                branch.finish_reason = "cancelled"
                return branch
            if branch.position >= len(tokens):
                branch.finish_reason = "stop"
                return branch
            i = branch.position
            branch.position += 1
            branch.tokens.append(i)
            branch.text += tokens[i]
            branch.context_tokens += 1
            branch.usage.add("generated_tokens", 1, branch.model)
            self._counters.generated_tokens += 1
            if params.wants_logprobs:
                branch.token_logprobs.append(branch.script.logprobs[i] if i < len(branch.script.logprobs) else -0.1)
            if params.top_logprobs:
                conf = branch.script.confidences
                branch.confidences.append(conf[i] if i < len(conf) else 1.0)
            hit = next((s for s in params.stop if s in branch.text[start_text:]), None)
            if hit is not None:
                branch.finish_reason, branch.matched_stop = "stop", hit
                return branch
            if stop_if is not None and stop_if(branch):
                branch.finish_reason = "halted"
                return branch
            await asyncio.sleep(0)  # one "decode step": let the other branches advance
        branch.finish_reason = "length"
        return branch

    async def score(self, branch: Branch, continuation: str) -> float:
        assert isinstance(branch, FakeBranch)
        n = len(continuation.split())
        branch.usage.add("scored_tokens", n, branch.model)
        if self.score_fn is not None:
            return self.score_fn(branch.prompt + branch.text, continuation)
        return -0.1 * n

    async def append(self, branch: Branch, text: str) -> Branch:
        assert isinstance(branch, FakeBranch)
        n = self._prompt_tokens(text)
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
