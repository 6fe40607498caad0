"""The contract between strategies and engines.

Four pieces, small enough to hold in your head:

* ``SamplingParams`` -- how one ``extend`` call samples (a plain dataclass, validated at the edge).
* ``Usage`` -- the token and time account of one request; every branch of the request adds to the same object.
* ``Branch`` -- a live sequence: prompt + generated tokens + the KV cells that hold them. ``fork`` is cheap (children
  share the parent's KV cells), ``extend`` generates, ``score`` reads the log-probability of a continuation,
  ``release`` frees the KV cells at once (and cancels an ``extend`` in flight).
* ``Engine`` -- owns the model and decodes every live branch of every request in one batch per step.

A strategy only ever talks to ``Engine.open`` and the ``Branch`` methods, so the same strategy runs on the in-process
llama.cpp engine, a remote OpenAI-compatible server, or the deterministic fake engine of the tests.

How the contract grew, and why (each change was made once, for every engine and strategy):

* **Several models** (two-model collaboration: cascades, SpecReason, GlimpRouter, a judge). One engine holds every
  model a request uses, so that one scheduler decodes them all: two llama.cpp thread pools on the same cores slow
  both models down manyfold. ``Engine.open(prompt, usage, model=NAME)`` opens a conversation on any model the engine
  can load (``None`` is the engine's default model), and ``Branch.model`` says which model a branch lives on.
* **Carrying text across** (``Branch.append``): a step one model wrote is evaluated into another model's branch as
  if that branch had written it, so the other model's KV cache follows the conversation and only the new tokens are
  computed. The same call lets a strategy insert its own text (a verification question, a probe) into a branch.
* **Accounting per model and per kind**: ``Usage`` keeps the totals it always had and, beside them, the same counters
  per model (``Usage.models``) plus drafted/accepted tokens of speculative decoding and wall time per named stage
  (``Usage.stages``, e.g. the sandbox). Engines count through ``Usage.add`` so both views always agree.
* **A prefix cache across requests** (``prompt_tokens_cached``): the in-process engine keeps the KV of finished
  requests' prompts and a new prompt reuses its longest cached prefix, so the system prompt and few-shot examples
  that every problem of a benchmark and every client of a server repeats are evaluated once. A request's cost is then
  no longer its prompt length: the counter says how much of ``prompt_tokens`` came from the cache (OpenAI reports the
  same as ``prompt_tokens_details.cached_tokens``), so every Pareto point counts what it really computed.
* **Engines that cannot score** (``ScoreUnsupportedError``, ``Branch.last_top_logprobs``): many OpenAI-compatible
  servers return no usable prompt logprobs (llama-cpp-python 0.3 shifts them by one token, vLLM's chat API and some
  SGLang modes have none), so a remote ``score`` is impossible there, yet every server returns the top-k alternatives
  of a *generated* token. ``score`` on such an engine raises ``ScoreUnsupportedError`` (a documented exception rather
  than a capability flag, because the remote engine learns it from a lazy probe, i.e. only inside an async call), and
  an ``extend`` with ``top_logprobs`` keeps the alternatives of its last sampled token in ``last_top_logprobs``, so a
  Yes/No verifier can read P(Yes) from one greedy token instead. One dict per branch, overwritten per token, not a
  list per token: DeepConf asks for ``top_logprobs`` on every token of every branch, and only the last one is needed.
* **Hidden states** (``Branch.hidden``, ``SamplingParams.hidden``, ``HiddenUnsupportedError``): nothing available
  ranks the bundled models' own work much better than chance, but a linear probe on the model's final hidden state
  (the vector the output head reads) does (issue 33, ``ponder.probes``). ``await branch.hidden()`` returns that
  vector after the branch's whole context -- what the model "thinks" having read the prompt and every token of the
  branch -- for a verifier, a vote weight or a step scorer to read. The decode that sampled a branch's last token
  already computed it: an extend with ``hidden=True`` keeps it (``Branch.hidden_state``), so ``hidden()`` after a
  branch ended at end-of-generation is free, and otherwise costs the evaluation of one token (the branch's last,
  not yet in its KV cells), counted as ``scored_tokens``; every vector read counts one ``hidden_states``. A method
  plus an opt-in flag, not a per-token list: a vector is kilobytes, and strategies need it at a few chosen ends (a
  finished branch, each step of a search), never at every token. Remote servers return no hidden states: ``hidden``
  raises ``HiddenUnsupportedError`` there (the default of ``Engine.hidden``), as ``score`` does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

Message = dict[str, str]  # {"role": "user", "content": "..."}


class PonderError(Exception):
    """An error with a message meant for the user (the CLI prints it as one line; the server returns it as 4xx)."""


class EngineError(PonderError):
    """The engine itself failed (a decode error, a broken loop): not the request's fault; the server answers 500."""


class PromptTooLongError(PonderError):
    """The prompt (plus the tokens it asks for) can never fit in the engine's context."""


class ScoreUnsupportedError(PonderError):
    """``score`` is impossible on this engine (a remote server without usable prompt logprobs). A caller that can do
    without exact scores catches it and reads ``Branch.last_top_logprobs`` of a generated token instead."""


class HiddenUnsupportedError(PonderError):
    """``hidden`` is impossible on this engine (a remote server returns no hidden states). A caller that can do without
    a probe's score catches it and falls back to another signal, or reports it as the user's error."""


class RemoteUnavailableError(PonderError):
    """No configured remote server could be reached (the ponder server answers 503 for it). Defined here, not in the
    remote engine's package (``ponder.engine.remote``), so that the server can tell it apart without importing the
    optional openai client."""


@dataclass
class SamplingParams:
    """How one ``Branch.extend`` call samples. ``temperature == 0`` means greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40  # 0 disables
    min_p: float = 0.0
    max_tokens: int = 512  # tokens generated by this extend call at most
    stop: tuple[str, ...] = ()  # stop strings; the matched string stays in the branch text (see Branch.text)
    seed: int | None = None  # reseeds this branch's generator when the extend starts; None keeps its own stream
    logprobs: bool = False  # record the chosen token's log-probability at each step
    top_logprobs: int = 0  # also record confidence (-mean of the top-k logprobs, as in DeepConf) and entropy
    ignore_eos: bool = False  # keep generating past end-of-generation tokens (benchmarks with a fixed length)
    hidden: bool = False  # keep the final hidden state the last decode computed (``Branch.hidden`` is then free)

    def validate(self) -> SamplingParams:
        """Raise ``ValueError`` naming the first bad field; return self so edges can write ``p.validate()``."""
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 5.0):
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not (0 <= self.top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


COUNTERS = ("prompt_tokens", "prompt_tokens_shared", "generated_tokens", "scored_tokens", "drafted_tokens",
            "accepted_tokens", "probe_tokens", "prompt_tokens_cached", "hidden_states")


@dataclass
class Usage:
    """Token and time account of one request, added to by every branch that belongs to it.

    ``prompt_tokens`` counts each prompt once, and text a strategy ``append``-s to a branch; ``prompt_tokens_shared``
    counts context tokens that forks reused from their parent's KV cells instead of recomputing them;
    ``generated_tokens`` counts every sampled token of every branch, cancelled ones included (that is the honest
    cost); ``scored_tokens`` counts tokens fed by ``score``; ``drafted_tokens`` and ``accepted_tokens`` count the
    draft model's proposals under speculative decoding and how many of them the target kept (the accepted ones are
    also in ``generated_tokens``, on the target model); ``probe_tokens`` counts the answer probes of early exit
    (``ponder.stopping.EarlyExit``): the probe text appended to a fork and the probe's reply, in no other counter;
    ``prompt_tokens_cached`` counts the part of ``prompt_tokens`` whose KV cells came from the engine's prefix cache
    (an earlier request's prompt) instead of being computed; ``hidden_states`` counts the final hidden states read
    (``Branch.hidden``: vectors, not tokens; a token evaluated only to read one is in ``scored_tokens``).
    The fields are totals over every model; ``models`` holds the same counters per model name, and ``stages`` wall
    seconds per named stage (``"sandbox"``, ...).
    """

    prompt_tokens: int = 0
    prompt_tokens_shared: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    probe_tokens: int = 0
    prompt_tokens_cached: int = 0
    hidden_states: int = 0
    wall_s: float = 0.0
    models: dict[str, dict[str, int]] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, kind: str, n: int, model: str) -> None:
        """Count ``n`` tokens of ``kind`` (one of ``COUNTERS``) spent on ``model``."""
        setattr(self, kind, getattr(self, kind) + n)
        per_model = self.models.setdefault(model, {})
        per_model[kind] = per_model.get(kind, 0) + n

    def add_stage(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def to_dict(self) -> dict:
        out = {kind: getattr(self, kind) for kind in COUNTERS if kind in COUNTERS[:4] or getattr(self, kind)}
        out["wall_s"] = round(self.wall_s, 4)
        if self.models:
            out["models"] = {name: dict(counts) for name, counts in self.models.items()}
        if self.stages:
            out["stages"] = {name: round(s, 4) for name, s in self.stages.items()}
        return out


@dataclass(eq=False)  # identity semantics: branches live in sets and dicts
class Branch:
    """One live sequence. Engines create branches; strategies call the methods below.

    ``text`` is exactly the detokenized ``tokens``: everything after the prompt, sampled or appended, in order. When a
    stop string ends an extend, the string stays in ``text`` (``matched_stop`` says which) because its tokens are in
    the KV cells and a later ``extend`` continues after them.
    """

    engine: Engine
    usage: Usage
    context_tokens: int  # tokens in the sequence: prompt + generated so far
    model: str = ""  # the name of the model this branch lives on (``Engine.open(..., model=)``)
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "halted" | "cancelled" once an extend ended; None before
    matched_stop: str | None = None
    appended_tokens: int = 0  # how many of ``tokens`` came from ``append`` rather than sampling
    token_logprobs: list[float] = field(default_factory=list)  # per sampled token
    confidences: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)  # of the top-k alternatives, renormalised (nats)
    # The top-k alternatives (token text -> logprob) of the last token an extend with ``top_logprobs`` sampled on this
    # branch (a fork starts with none); filled by the engines that can raise ``ScoreUnsupportedError`` (remote, fake).
    last_top_logprobs: dict[str, float] = field(default_factory=dict)
    # The final hidden state (a float32 vector) after the branch's first ``hidden_len`` tokens (the prompt alone: 0),
    # kept by the engine when a decode computed it; ``hidden()`` reads it when it is current.
    hidden_state: object = None
    hidden_len: int = -1
    released: bool = False

    async def extend(self, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        """Generate until end-of-generation, a stop string or ``params.max_tokens``; return self.

        ``stop_if(branch)`` is called after every new token; when it returns True the extend ends at once with
        ``finish_reason == "halted"`` (the branch keeps its KV cells: release it if it is not wanted). This is how
        strategies apply per-step rules (a confidence floor, a shared token budget) without a loop of their own.
        """
        if self.released:
            raise PonderError("cannot extend a released branch")
        return await self.engine.extend(self, params, stop_if)

    async def append(self, text: str) -> Branch:
        """Evaluate ``text`` into this branch as if it had been generated (no sampling); return self.

        The tokens are computed once into the branch's KV cells and count as ``prompt_tokens`` of the branch's model.
        Use it to carry what another model wrote into this model's branch, or to add a question or a probe.
        """
        if self.released:
            raise PonderError("cannot append to a released branch")
        if not text:
            return self
        return await self.engine.append(self, text)

    async def fork(self, n: int) -> list[Branch]:
        """Return ``n`` new branches that share this branch's KV cells; this branch stays usable."""
        if self.released:
            raise PonderError("cannot fork a released branch")
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        return await self.engine.fork(self, n)

    async def score(self, continuation: str) -> float:
        """Sum of log-probabilities of ``continuation`` following this branch (the branch itself is unchanged).
        Raises ``ScoreUnsupportedError`` on an engine that cannot compute it (see the module docstring)."""
        if self.released:
            raise PonderError("cannot score on a released branch")
        return await self.engine.score(self, continuation)

    async def hidden(self):
        """The final hidden state (the vector the output head reads, float32, the model's width) after the prompt
        and everything in ``text``. Free when the decode that sampled the branch's last token computed it (an extend
        with ``hidden=True`` that ended at end-of-generation), else one token evaluated (``scored_tokens``). Raises
        ``HiddenUnsupportedError`` on an engine that cannot (see the module docstring)."""
        if self.released:
            raise PonderError("cannot read the hidden state of a released branch")
        if self.hidden_state is not None and self.hidden_len == len(self.tokens):
            self.usage.add("hidden_states", 1, self.model)
            return self.hidden_state
        return await self.engine.hidden(self)

    def release(self) -> None:
        """Free this branch's KV cells now; an extend in flight ends with ``finish_reason == "cancelled"``."""
        if not self.released:
            self.released = True
            self.engine.release(self)

    def history(self) -> dict:
        """What a fork inherits from this branch: its generated text and per-token records (engines pass these to
        the child's constructor)."""
        return {"text": self.text, "tokens": list(self.tokens), "appended_tokens": self.appended_tokens,
                "model": self.model, "token_logprobs": list(self.token_logprobs),
                "confidences": list(self.confidences), "entropies": list(self.entropies),
                "hidden_state": self.hidden_state, "hidden_len": self.hidden_len}

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else None

    @property
    def mean_confidence(self) -> float | None:
        return sum(self.confidences) / len(self.confidences) if self.confidences else None


StopIf = Callable[[Branch], bool]


@dataclass
class ModelInfo:
    name: str
    path: str
    sha256: str | None = None


@dataclass
class EngineStats:
    """Counters an engine keeps over its lifetime (tests and ``/metrics`` read them)."""

    prefills: int = 0  # prompts evaluated
    prefill_tokens: int = 0
    decode_steps: int = 0  # llama_decode calls (or remote requests)
    generated_tokens: int = 0
    live_branches: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    waiting: int = 0  # jobs waiting for KV room or a free sequence


class Engine(ABC):
    """Owns a model; turns branch operations into batched decode steps."""

    model: ModelInfo

    @abstractmethod
    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        """Evaluate a prompt once and return its root branch. A list of messages goes through the chat template.

        ``model`` names the model to open it on (a bundled name or a GGUF path on the in-process engine, a served
        model name on a remote one); ``None`` is the engine's default model, ``self.model``. An engine loads a
        model the first time it is asked for and keeps it; a model it cannot serve is a ``PonderError``."""

    @abstractmethod
    async def append(self, branch: Branch, text: str) -> Branch: ...

    @abstractmethod
    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch: ...

    @abstractmethod
    async def fork(self, branch: Branch, n: int) -> list[Branch]: ...

    @abstractmethod
    async def score(self, branch: Branch, continuation: str) -> float: ...

    async def hidden(self, branch: Branch):
        """The final hidden state after ``branch``'s whole context (``Branch.hidden`` calls this only when the branch
        does not hold it already); stores it in ``branch.hidden_state``/``hidden_len`` and counts it. Engines that
        cannot read hidden states keep this default."""
        raise HiddenUnsupportedError(f"this engine ({type(self).__name__}) cannot read hidden states; run on the "
                                     f"in-process engine")

    @abstractmethod
    def release(self, branch: Branch) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Free the model and its context. The engine is unusable afterwards."""
