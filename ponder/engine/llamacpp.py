"""The in-process engine: llama.cpp through llama-cpp-python's low-level API, every live branch in one batch.

How it works, in the manner of llama.cpp's ``batched`` and ``parallel`` examples:

* Each model has one context with many sequences (``n_seq_max``) over one unified KV cache (a ``_ModelRunner``). A
  branch is a sequence id of its model's context.
* A prompt is evaluated once (``open``). ``fork`` copies the sequence id onto new ids with ``llama_memory_seq_cp``,
  which *shares* the KV cells (no copy, no recompute). ``release`` drops the id with ``llama_memory_seq_rm``.
  ``append`` evaluates text into a branch as if it had been generated (how text moves from one model to another).
* Each branch keeps one *pending* token: the last token it received, not yet in its KV cells. A step puts the pending
  token of every branch that is extending, plus chunks of prompts waiting to be evaluated, into a single
  ``llama_decode`` call; the logits that come back give every branch its next pending token.
* **One compute worker for every model.** One asyncio task (``_run``) plans the steps of every model in turn; the
  decodes and the sampling run on one worker thread, so two models never decode at the same time (two llama.cpp
  thread pools on the same cores slow both down manyfold) and the event loop stays free (the server keeps answering
  while the model computes). Callers are coroutines that wait on futures; all KV operations are queued and applied by
  the worker right before the next decode of their model. Models are loaded on first use, on the worker.
* Admission: a job starts only when its model's KV cache has room for everything it may still write (an extend
  reserves its ``max_tokens``), so a running branch never fails for lack of cells; when the cache is full new jobs
  wait in FIFO order. A job that could never fit is refused at once with a clear error.
* **Prefix cache across requests** (``prefix_cache_tokens``, 0 turns it off): when a root branch is released, its
  prompt's KV is copied out of the context (``llama_state_seq_get_data``) into the cache, outside llama.cpp, and a
  later ``open`` whose prompt starts the same way copies the longest such prefix into its new sequence
  (``llama_state_seq_set_data``, then the positions past the shared prefix are dropped) and evaluates only the rest;
  ``Usage.prompt_tokens_cached`` counts what it reused. Outside the context, because in the unified KV cache every
  sequence's attention scans every used cell: cells kept there slowed every decode (``benchmarks/bench_aging.py``:
  0.74 of a fresh engine's speed with 6,361 cached cells, 0.99 once they were dropped). So the context holds only
  live branches, a cached prompt holds no cell or sequence id a job could wait for, and a hit costs a memory copy
  (about 12 KB a token for the 0.5B). The cache keeps at most ``prefix_cache_tokens`` tokens, least recently used
  leaving first (``prefix_cache.py``). Under speculative decoding a cached prompt keeps its shadow's KV too, copied
  out of and into the draft's context alongside.
* **Speculative decoding** (``draft=``): every branch of the target model has a *shadow* sequence in the draft
  model's context holding the same tokens. A speculative step lets the draft propose ``k`` tokens for every
  extending branch (k draft decodes, all branches batched), then the target verifies all proposals of all branches
  in one decode, and modified rejection sampling (``sampling.speculative_choice``) keeps exactly the target's
  distribution: greedy output is the target's own token for token. Rejected tokens are removed from both caches
  (``llama_memory_seq_rm`` from a position on). ``k`` adapts per branch to its acceptance (up 2 when every proposal
  was kept, down 1 otherwise, as in Hugging Face's assisted generation). The draft's KV is sized with a margin and
  not admitted separately: a shadow never holds more than its target branch plus the proposals of one step.
* **Hidden states** (``Branch.hidden``): llama.cpp returns the final hidden state of a decode's output rows (pooling
  NONE) once ``llama_set_embeddings`` is on, but then it makes *every* token of the batch an output row (logits
  included). So embeddings are switched on only for a step whose every token is an output row anyway: the decodes
  (each sampled token is one) and the one-token evaluations ``hidden`` asks for. A step that also evaluates a
  prompt or appended text runs with embeddings off; an extend with ``hidden=True`` then simply keeps no vector for
  that token (its branch's ``hidden`` costs one token later, never a wrong vector). ``benchmarks/bench_hidden.py``
  measures what the vectors cost per decode.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Sequence

import llama_cpp as llama
import numpy as np

from .base import (Branch, Engine, EngineError, EngineStats, Message, ModelInfo, PonderError, PromptTooLongError,
                   SamplingParams, StopIf, Usage)
from .cpu_check import use_extra_buffers
from .prefix_cache import PREFIX_CACHE_TOKENS, CachedPrompt, PrefixCache, Segment, drop
from .sampling import Sample, describe, distribution, draw, sample, speculative_choice, token_logprob

DRAFT_K_START, DRAFT_K_MAX = 4, 12  # proposals per speculative step: the first, and the cap of the adaptation


@llama.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if os.environ.get("PONDER_VERBOSE"):
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def quiet_llama_log() -> None:
    """Send llama.cpp's log to stderr only with PONDER_VERBOSE set: its load log (and a harmless vocabulary warning
    about the bundled models) is noise to a user."""
    llama.llama_log_set(_llama_log, ctypes.c_void_p(0))


@dataclass(eq=False)
class LlamaBranch(Branch):
    runner: _ModelRunner | None = None
    seq_id: int = -1
    pending: int = -1  # last token received, not yet in the KV cells
    n_past: int = 0  # tokens in the KV cells (positions 0..n_past-1)
    segment: Segment | None = None  # the segment this branch writes into; its parents hold the cells before
    prompt_ids: list[int] | None = None  # a root's prompt tokens (the text-keeping engines have a str prompt)
    prompt_end: Segment | None = None  # a root's own hold on its prompt's cells, set once they are evaluated
    seeds: np.random.SeedSequence | None = None
    rng: np.random.Generator | None = None
    utf8_state: tuple[bytes, int] = (b"", 0)  # incremental UTF-8 decoder state (a character split across tokens)
    job: _Extend | None = None
    # speculative decoding: the draft model's copy of this branch, the tokens it has not evaluated yet, and k
    shadow: LlamaBranch | None = None
    draft_behind: list[int] = field(default_factory=list)
    draft_k: int = DRAFT_K_START
    is_shadow: bool = False
    last_read: int = -1  # the token before ``pending`` when ``pending`` is end-of-generation (``hidden`` re-reads it)


@dataclass(eq=False)
class _Extend:
    branch: LlamaBranch
    params: SamplingParams
    stop_if: StopIf | None
    future: asyncio.Future
    remaining: int  # tokens this extend may still generate
    reserved: int = 0  # KV cells held for it
    text_start: int = 0  # stop strings are searched in the text generated by this extend only


@dataclass(eq=False)
class _Feed:
    """Tokens to write into one sequence: a prompt (``open``), appended text (``append``) or a ``score``
    continuation."""

    branch: LlamaBranch
    tokens: list[int]
    future: asyncio.Future
    want_logprobs: bool  # score: sum log p(tokens[i+1] | ...) over the fed tokens
    targets: list[int] = field(default_factory=list)  # the token each fed position should predict (score)
    want_hidden: bool = False  # hidden: keep the final hidden state of the last fed token (in ``hidden``)
    hidden: np.ndarray | None = None
    done: int = 0
    reserved: int = 0
    logprob: float = 0.0


@dataclass
class _StepPlan:
    kv_ops: list[tuple]
    decodes: list[_Extend]
    feeds: list[tuple[_Feed, int, int]]  # (feed, start, stop) slices of feed.tokens
    drafts: list[int] = field(default_factory=list)  # speculative: proposals per decode (same order); empty = plain
    draft_kv_ops: list[tuple] = field(default_factory=list)
    hidden: bool = False  # embeddings on for this step (every token of it is an output row)


@dataclass
class _StepOut:
    samples: list[list[Sample]]  # per decode: the new tokens in order (one, or up to k + 1 when speculative)
    feed_logprobs: list[float]  # one sum per feed slice that wants logprobs
    hidden: list[np.ndarray | None] = field(default_factory=list)  # per decode: its rows' hidden states, if kept
    feed_hidden: list[np.ndarray] = field(default_factory=list)  # per feed slice that wants a hidden state


class _ModelRunner:
    """One model: its llama.cpp context, sequence ids, queues and KV accounting, and the Branch operations on it.

    A runner never decodes on its own: the engine's scheduler asks it to ``plan`` a step, runs ``step`` on the one
    worker thread, and hands the result to ``apply`` back on the event loop."""

    def __init__(self, engine: LlamaCppEngine, model: ModelInfo, *, n_ctx: int, n_seq_max: int, n_batch: int,
                 n_threads: int, prefix_cache_tokens: int):
        self.engine = engine
        self.model = model
        params = llama.llama_model_default_params()
        # False where llama.cpp's AMX or repacked-weight kernels die on this CPU (cpu_check.py asks a child once).
        params.use_extra_bufts = use_extra_buffers(model.path, threads=n_threads)
        self._model = llama.llama_model_load_from_file(model.path.encode(), params)
        if not self._model:
            raise PonderError(f"llama.cpp could not load {model.path} (not a valid GGUF model?)")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama.llama_model_n_embd(self._model)
        self._embeddings = False  # llama_set_embeddings' current value
        n_ctx = min(n_ctx, llama.llama_model_n_ctx_train(self._model))
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True  # one pool of cells that sequences share: forks reuse the prompt's cells
        cparams.n_batch = cparams.n_ubatch = max(n_batch, n_seq_max)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.pooling_type = llama.LLAMA_POOLING_TYPE_NONE  # embeddings, when on, are per token: the hidden states
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise PonderError(f"llama.cpp could not create a context with {n_ctx} cells and {n_seq_max} sequences")
        self._memory = llama.llama_get_memory(self._ctx)
        self.n_ctx = llama.llama_n_ctx(self._ctx)
        self.n_batch = cparams.n_batch
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._chat_format = self._load_chat_template()
        self._pieces: dict[int, bytes] = {}  # token -> its bytes, filled as tokens are first generated
        self._seeds = np.random.SeedSequence(engine.seed)
        self.draft: _ModelRunner | None = None  # set when this model is the target of speculative decoding

        self.n_seq_max = n_seq_max
        self._free_seqs = deque(range(n_seq_max))
        self._seq_waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._waiting: deque[_Extend | _Feed] = deque()
        self._decoding: list[_Extend] = []
        self._feeding: list[_Feed] = []
        self._kv_ops: list[tuple] = []
        self._cells_used = 0
        self._cells_reserved = 0
        self._live: set[LlamaBranch] = set()
        self.counters = EngineStats(kv_cells_total=self.n_ctx)
        # A draft model has none of its own: a target's cached prompt keeps its shadow's KV too.
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None

    # ---- text --------------------------------------------------------------------------------------------------

    def _load_chat_template(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._meta("tokenizer.chat_template")
        if template is None:
            return None
        eos = self.token_text(llama.llama_vocab_eos(self._vocab), special=True)
        bos_id = llama.llama_vocab_bos(self._vocab)
        bos = self.token_text(bos_id, special=True) if bos_id >= 0 else ""
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def _meta(self, key: str) -> str | None:
        size = llama.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama.llama_model_meta_val_str(self._model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def format_chat(self, messages: Sequence[Message]) -> str:
        if self._chat_format is None:
            raise PonderError(f"{self.model.name} has no chat template in its GGUF metadata; pass a raw prompt")
        return self._chat_format(messages=list(messages)).prompt

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            raise PonderError(f"tokenizer failed on a text of {len(data)} bytes")
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # piece longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int, *, special: bool = False) -> str:
        return self.token_bytes(token, special=special).decode("utf-8", errors="replace")

    def _append_token(self, branch: LlamaBranch, token: int) -> str:
        """Add ``token`` to the branch's tokens and text; return the new text."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate(branch.utf8_state)
        if token not in self._pieces:
            self._pieces[token] = self.token_bytes(token)
        piece = decoder.decode(self._pieces[token])
        branch.utf8_state = decoder.getstate()
        branch.tokens.append(token)
        branch.text += piece
        return piece

    def prompt_tokens(self, prompt: str | Sequence[Message]) -> list[int]:
        text = prompt if isinstance(prompt, str) else self.format_chat(prompt)
        tokens = self.tokenize(text, add_bos=llama.llama_vocab_get_add_bos(self._vocab))
        if not tokens:
            raise PonderError("the prompt is empty")
        if len(tokens) + 1 > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx} (prompt and answer together)"
            )
        return tokens

    # ---- the Branch API --------------------------------------------------------------------------------------

    async def open(self, tokens: list[int], usage: Usage) -> LlamaBranch:
        """The root branch of ``tokens``: the longest prefix that the prefix cache holds is shared, the rest
        evaluated (under speculative decoding in the draft model's shadow too)."""
        (seq,) = await self._take_seqs(1)
        shadow_seq = None
        if self.draft is not None:
            try:
                (shadow_seq,) = await self.draft._take_seqs(1)
            except BaseException:
                self._return_seqs([seq])
                raise
        hit, reused = self.prefix_cache.longest(tokens[:-1]) if self.prefix_cache is not None else (None, 0)
        if hit is not None and not all(r._has_room(len(hit.tokens)) for r in filter(None, (self, self.draft))):
            hit, reused = None, 0  # no free cells to copy the whole cached prompt into: evaluate the prompt instead
        root = self._root(seq, tokens, usage, hit, reused)
        if self.draft is not None:
            root.shadow = self.draft._root(shadow_seq, tokens, usage, hit, reused, shadow=True)
        for runner in filter(None, (self, self.draft)):
            runner.counters.prefills += 1
        rest = tokens[reused:-1]
        try:
            await asyncio.gather(self._feed(root, rest),
                                 *([self.draft._feed(root.shadow, rest)] if root.shadow is not None else []))
        except BaseException:
            root.release()
            raise
        for branch in filter(None, (root, root.shadow)):
            # The cells so far are the prompt's: the root keeps a hold of its own on them (so that they can stay in
            # the prefix cache when it is released) and writes on into a new segment.
            branch.prompt_end = branch.segment
            branch.segment.holders += 1
            branch.segment = Segment(parent=branch.prompt_end)
        return root

    def _root(self, seq: int, tokens: list[int], usage: Usage, hit: CachedPrompt | None, reused: int, *,
              shadow: bool = False) -> LlamaBranch:
        """A new root branch on sequence ``seq`` whose first ``reused`` cells are copied in from the cached prompt
        ``hit`` (this context's copy of it: the model's, or a shadow's in the draft's context)."""
        usage.add("prompt_tokens", len(tokens), self.model.name)
        if reused:
            self._kv_ops.append(("load", seq, hit, int(shadow), reused))
            self._cells_used += reused
            usage.add("prompt_tokens_cached", reused, self.model.name)
        root = LlamaBranch(engine=self.engine, usage=usage, context_tokens=len(tokens), model=self.model.name,
                           runner=self, seq_id=seq, pending=tokens[-1], n_past=reused, segment=Segment(cells=reused),
                           prompt_ids=tokens, seeds=self._seeds.spawn(1)[0], is_shadow=shadow)
        root.rng = np.random.default_rng(root.seeds)
        self._live.add(root)
        return root

    async def _feed(self, branch: LlamaBranch, tokens: list[int]) -> None:
        if tokens:
            feed = _Feed(branch, tokens, self.engine.new_future(), want_logprobs=False)
            await self._submit(feed, cells=len(feed.tokens))
            self.counters.prefill_tokens += len(feed.tokens)

    async def fork(self, branch: LlamaBranch, n: int) -> list[Branch]:
        if branch.job is not None:
            raise PonderError("cannot fork a branch while it is extending")
        seqs = await self._take_seqs(n)
        if branch.released:  # released while we waited for sequence ids
            self._return_seqs(seqs)
            raise PonderError("cannot fork a released branch")
        shadows = await self.draft.fork(branch.shadow, n) if branch.shadow is not None else [None] * n
        # The children and the parent go on in segments of their own, under the parent's segment so far.
        shared = branch.segment
        shared.holders += n
        branch.segment = Segment(parent=shared)
        children = []
        for seq, seeds, shadow in zip(seqs, branch.seeds.spawn(n), shadows):
            self._kv_ops.append(("cp", branch.seq_id, seq, -1))
            child = LlamaBranch(
                engine=self.engine, usage=branch.usage, context_tokens=branch.context_tokens, **branch.history(),
                runner=self, seq_id=seq, pending=branch.pending, n_past=branch.n_past,
                segment=Segment(parent=shared), seeds=seeds, rng=np.random.default_rng(seeds),
                utf8_state=branch.utf8_state, shadow=shadow, draft_behind=list(branch.draft_behind),
                draft_k=branch.draft_k, is_shadow=branch.is_shadow,
            )
            if not branch.is_shadow:
                branch.usage.add("prompt_tokens_shared", branch.n_past, self.model.name)
            self._live.add(child)
            children.append(child)
        return children

    async def extend(self, branch: LlamaBranch, params: SamplingParams, stop_if: StopIf | None) -> Branch:
        if branch.job is not None:
            raise PonderError("this branch is already extending")
        room = self.n_ctx - branch.n_past
        if params.max_tokens > room - 1:
            raise PromptTooLongError(
                f"the branch holds {branch.n_past + 1} tokens and asks for {params.max_tokens} more; the context "
                f"holds {self.n_ctx} (lower max_tokens or shorten the prompt)"
            )
        if params.seed is not None:
            branch.rng = np.random.default_rng(params.seed)
        branch.finish_reason = branch.matched_stop = None
        job = _Extend(branch, params, stop_if, self.engine.new_future(), remaining=params.max_tokens,
                      text_start=len(branch.text))
        branch.job = job
        await self._submit(job, cells=params.max_tokens)
        return branch

    async def append(self, branch: LlamaBranch, text: str) -> Branch:
        if branch.job is not None:
            raise PonderError("cannot append to a branch while it is extending")
        tokens = self.tokenize(text)
        if not tokens:
            return branch
        if branch.n_past + len(tokens) + 1 > self.n_ctx:
            raise PromptTooLongError(f"appending {len(tokens)} tokens after {branch.n_past + 1} does not fit in "
                                     f"the context of {self.n_ctx}")
        # The pending token goes into the cells first; the last appended token becomes the new pending one.
        fed = [branch.pending] + tokens[:-1]
        shadow_fed = branch.draft_behind + fed
        await asyncio.gather(
            self._feed(branch, fed),
            *([self.draft._feed(branch.shadow, shadow_fed)] if branch.shadow is not None else []))
        if branch.shadow is not None:
            branch.draft_behind = []
        branch.pending = tokens[-1]
        branch.tokens.extend(tokens)
        branch.appended_tokens += len(tokens)
        branch.text += text
        branch.utf8_state = (b"", 0)
        branch.context_tokens = branch.n_past + 1
        branch.usage.add("prompt_tokens", len(tokens), self.model.name)
        return branch

    async def score(self, branch: LlamaBranch, continuation: str) -> float:
        if branch.job is not None:
            raise PonderError("cannot score on a branch while it is extending")
        targets = self.tokenize(continuation, special=False)
        if not targets:
            raise PonderError("score needs a non-empty continuation")
        if branch.n_past + len(targets) + 1 > self.n_ctx:
            raise PromptTooLongError(f"scoring {len(targets)} tokens after {branch.n_past + 1} does not fit in "
                                     f"the context of {self.n_ctx}")
        (seq,) = await self._take_seqs(1)
        branch.segment.holders += 1
        probe = LlamaBranch(engine=self.engine, usage=branch.usage, context_tokens=branch.context_tokens,
                            model=branch.model, runner=self, seq_id=seq, n_past=branch.n_past,
                            segment=Segment(parent=branch.segment))
        self._kv_ops.append(("cp", branch.seq_id, seq, -1))
        self._live.add(probe)
        # Feeding [pending, t0 .. t(m-2)] yields the distributions that predict t0 .. t(m-1).
        feed = _Feed(probe, [branch.pending] + targets[:-1], self.engine.new_future(), want_logprobs=True,
                     targets=targets)
        try:
            await self._submit(feed, cells=len(feed.tokens))
        finally:
            probe.release()
        branch.usage.add("scored_tokens", len(targets), self.model.name)
        return feed.logprob

    async def hidden(self, branch: LlamaBranch) -> np.ndarray:
        """Evaluate the branch's last token on a temporary sequence and keep its final hidden state: the pending
        token, or, when the pending token is end-of-generation (not part of the text), the token before it again."""
        if branch.job is not None:
            raise PonderError("cannot read the hidden state of a branch while it is extending")
        eog = llama.llama_vocab_is_eog(self._vocab, branch.pending)
        if eog and branch.last_read < 0:
            raise PonderError("this branch holds no token whose hidden state could be read")
        token, keep = (branch.last_read, branch.n_past - 1) if eog else (branch.pending, branch.n_past)
        (seq,) = await self._take_seqs(1)
        branch.segment.holders += 1
        probe = LlamaBranch(engine=self.engine, usage=branch.usage, context_tokens=branch.context_tokens,
                            model=branch.model, runner=self, seq_id=seq, n_past=keep,
                            segment=Segment(parent=branch.segment))
        self._kv_ops.append(("cp", branch.seq_id, seq, keep if eog else -1))
        self._live.add(probe)
        feed = _Feed(probe, [token], self.engine.new_future(), want_logprobs=False, want_hidden=True)
        try:
            await self._submit(feed, cells=1)
        finally:
            probe.release()
        branch.hidden_state, branch.hidden_len = feed.hidden, len(branch.tokens)
        branch.usage.add("scored_tokens", 1, self.model.name)
        branch.usage.add("hidden_states", 1, self.model.name)
        return feed.hidden

    def release(self, branch: LlamaBranch) -> None:
        """Free the branch's cells now; a root's prompt is first copied out into the prefix cache, if there is one."""
        if self._cacheable(branch):
            entry = self.prefix_cache.add(branch.prompt_ids[:-1])
            if entry is not None:  # queued before the removal below, so the copy is taken while the cells exist
                self._kv_ops.append(("save", branch.seq_id, entry, 0))
                if branch.shadow is not None:
                    self.draft._kv_ops.append(("save", branch.shadow.seq_id, entry, 1))
        self._stop_jobs(branch)
        self._live.discard(branch)
        self._cells_used -= drop(branch.segment) + drop(branch.prompt_end)
        branch.segment = branch.prompt_end = None
        self._kv_ops.append(("rm", branch.seq_id))
        self._return_seqs([branch.seq_id])
        if branch.shadow is not None:
            branch.shadow.release()
        self.engine.kick()

    def _cacheable(self, root: LlamaBranch) -> bool:
        """Whether a released root's prompt goes to the prefix cache: it was evaluated and has a token to reuse. A
        shadow's prompt goes with its target's."""
        return (self.prefix_cache is not None and root.prompt_end is not None and not root.is_shadow
                and len(root.prompt_ids) > 1)

    def _has_room(self, cells: int) -> bool:
        """Whether ``cells`` cells are free beyond what live branches hold and admitted jobs may still write."""
        return self.n_ctx - self._cells_used - self._cells_reserved >= cells

    def _stop_jobs(self, branch: LlamaBranch) -> None:
        """End the branch's extend (as cancelled) and its feeds (with an error) and give back their reservations."""
        job = branch.job
        if job is not None:
            branch.job = None
            if job in self._decoding:
                self._decoding.remove(job)
            elif job in self._waiting:
                self._waiting.remove(job)
            self._cells_reserved -= job.reserved
            branch.finish_reason = "cancelled"
            if not job.future.done():
                job.future.set_result(branch)
        for feed in [f for f in (*self._feeding, *self._waiting) if isinstance(f, _Feed) and f.branch is branch]:
            (self._feeding if feed in self._feeding else self._waiting).remove(feed)
            self._cells_reserved -= feed.reserved
            if not feed.future.done():
                feed.future.set_exception(PonderError("the branch was released while its prompt was evaluated"))

    def stats(self) -> EngineStats:
        return replace(self.counters, live_branches=sum(1 for b in self._live if not b.is_shadow),
                       kv_cells_used=self._cells_used, waiting=len(self._waiting) + len(self._seq_waiters))

    def close(self) -> None:
        if self._ctx:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            llama.llama_model_free(self._model)
            self._ctx = self._model = None

    # ---- scheduling (on the event loop) ------------------------------------------------------------------------

    async def _take_seqs(self, n: int) -> list[int]:
        if n > self.n_seq_max:
            raise PonderError(f"asked for {n} branches at once; this engine holds at most {self.n_seq_max} "
                              f"(raise n_seq_max)")
        if len(self._free_seqs) >= n and not self._seq_waiters:
            return [self._free_seqs.popleft() for _ in range(n)]
        waiter = self.engine.new_future()
        self._seq_waiters.append((n, waiter))
        return await waiter

    def _return_seqs(self, seqs: list[int]) -> None:
        self._free_seqs.extend(seqs)
        while self._seq_waiters and len(self._free_seqs) >= self._seq_waiters[0][0]:
            n, waiter = self._seq_waiters.popleft()
            if not waiter.done():
                waiter.set_result([self._free_seqs.popleft() for _ in range(n)])

    async def _submit(self, job: _Extend | _Feed, *, cells: int):
        own = job.branch.n_past
        if cells > self.n_ctx - own:
            raise PromptTooLongError(f"needs {cells} KV cells beyond the {own} it holds; the context has "
                                     f"{self.n_ctx} in all")
        self._waiting.append(job)
        job.reserved = 0
        self.engine.kick()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.branch.release()  # the caller gave up (client gone, Ctrl-C): free the cells now
            raise

    def admit(self) -> None:
        """Start waiting jobs in FIFO order while the KV cache has room for all they may write."""
        while self._waiting:
            job = self._waiting[0]
            need = job.remaining if isinstance(job, _Extend) else len(job.tokens)
            # A draft model's shadows live in the margin of its context (see the module docstring): they only need
            # cells that are free, not unreserved.
            reserved = 0 if job.branch.is_shadow else self._cells_reserved
            if self.n_ctx - self._cells_used - reserved < need:
                break
            self._waiting.popleft()
            job.reserved = need
            self._cells_reserved += need
            (self._decoding if isinstance(job, _Extend) else self._feeding).append(job)

    @property
    def busy(self) -> bool:
        return bool(self._decoding or self._feeding or self._kv_ops)

    @property
    def blocked(self) -> bool:
        return bool(self._waiting)

    def plan(self) -> _StepPlan:
        decodes = list(self._decoding)
        drafts = []
        if self.draft is not None and decodes:
            # Up to k proposals per branch, fewer near the end of its token allowance, and all of them within one
            # target batch of n_batch tokens.
            fair = max(1, self.n_batch // len(decodes) - 1)
            drafts = [max(0, min(job.branch.draft_k, job.remaining - 1, fair)) for job in decodes]
        room = self.n_batch - len(decodes) - sum(drafts)
        # Embeddings make every token of the step an output row: on only when every token is one anyway (see the
        # module docstring). Text to evaluate goes first; the hidden-state reads wait for a step without it.
        plain = [f for f in self._feeding if not (f.want_hidden or f.want_logprobs)]
        hidden = not plain and (any(f.want_hidden for f in self._feeding) or any(j.params.hidden for j in decodes))
        feeds = []
        for feed in self._feeding:
            if room <= 0:
                break
            if feed.want_hidden and not hidden:
                continue
            take = min(room, len(feed.tokens) - feed.done)
            feeds.append((feed, feed.done, feed.done + take))
            room -= take
        ops, self._kv_ops = self._kv_ops, []
        draft_ops = []
        if any(drafts):  # the speculative step uses the draft's cache: its queued operations come first
            draft_ops, self.draft._kv_ops = self.draft._kv_ops, []
        return _StepPlan(ops, decodes, feeds, drafts, draft_ops, hidden)

    def fail_waiting(self, exc: BaseException) -> None:
        for job in self._waiting:
            job.branch.job = None
            if not job.future.done():
                job.future.set_exception(exc)
        self._waiting.clear()

    def fail_all(self, exc: BaseException) -> None:
        """After a failed decode the KV state is unknown: end every job with the error and clear the cache."""
        for job in [*self._decoding, *self._feeding, *self._waiting]:
            if not job.future.done():
                job.future.set_exception(exc)
        for branch in list(self._live):
            branch.job = None
            branch.release()
        if self.prefix_cache is not None:  # the copies of the prompts just released will not be taken
            self.prefix_cache.clear()
        self._decoding.clear()
        self._feeding.clear()
        self._waiting.clear()
        self._kv_ops = [("clear",)]
        self._cells_used = self._cells_reserved = 0

    # ---- the worker thread: KV operations, one decode, sampling ---------------------------------------------------

    def _apply_kv_ops(self, ops: list[tuple]) -> None:
        for op in ops:
            if op[0] == "cp":  # sequence op[1]'s cells before position op[3] (-1: all) join sequence op[2]
                llama.llama_memory_seq_cp(self._memory, op[1], op[2], 0, op[3])
            elif op[0] == "rm":
                llama.llama_memory_seq_rm(self._memory, op[1], -1, -1)
            elif op[0] == "rm_from":  # positions op[2].. of sequence op[1]: rejected drafts
                llama.llama_memory_seq_rm(self._memory, op[1], op[2], -1)
            elif op[0] == "save":  # copy the prompt of sequence op[1] out into cached prompt op[2], slot op[3]
                _, seq, entry, slot = op
                llama.llama_memory_seq_rm(self._memory, seq, len(entry.tokens), -1)  # the sequence is released next
                size = llama.llama_state_seq_get_size(self._ctx, seq)
                state = (ctypes.c_uint8 * size)()
                if llama.llama_state_seq_get_data(self._ctx, state, size, seq) != size:
                    raise EngineError(f"could not copy sequence {seq}'s prompt out of the KV cache")
                entry.states[slot] = state
            elif op[0] == "load":  # cached prompt op[2] (slot op[3]) into sequence op[1], keeping op[4] positions
                _, seq, entry, slot, keep = op
                state = entry.states[slot]
                if llama.llama_state_seq_set_data(self._ctx, state, len(state), seq) != len(state):
                    raise EngineError(f"could not copy a cached prompt into sequence {seq}")
                llama.llama_memory_seq_rm(self._memory, seq, keep, -1)
            else:
                llama.llama_memory_clear(self._memory, True)

    def _decode(self, items: list[tuple[int, int, int, bool]], hidden: bool = False) -> np.ndarray:
        """One ``llama_decode`` of (token, position, sequence, wants logits) items; the logits rows asked for. With
        ``hidden`` every item must want logits, and the hidden states of all rows are in ``_hidden_rows()``."""
        if hidden != self._embeddings:
            llama.llama_set_embeddings(self._ctx, hidden)
            self._embeddings = hidden
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = (
                token, pos, 1, seq, logits)
        batch.n_tokens = len(items)
        rc = llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc} (no room in the KV cache or a bad batch)")
        n_out = sum(1 for item in items if item[3])
        if hidden:
            assert n_out == len(items), "a step with embeddings on must ask for every row"
            self._n_rows = n_out
        return np.ctypeslib.as_array(llama.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))

    def _hidden_rows(self) -> np.ndarray:
        """The final hidden states of the last decode's rows (a view: copy what you keep)."""
        return np.ctypeslib.as_array(llama.llama_get_embeddings(self._ctx), shape=(self._n_rows, self.n_embd))

    def step(self, plan: _StepPlan) -> _StepOut:
        self._apply_kv_ops(plan.kv_ops)
        proposals = self.draft._propose(plan) if any(plan.drafts) else [([], [])] * len(plan.decodes)
        items = []
        for job, (drafted, _) in zip(plan.decodes, proposals):
            b = job.branch
            items += [(token, b.n_past + i, b.seq_id, True) for i, token in enumerate([b.pending, *drafted])]
        for feed, start, stop in plan.feeds:
            b = feed.branch
            items += [(feed.tokens[k], b.n_past + k - start, b.seq_id, feed.want_logprobs or feed.want_hidden)
                      for k in range(start, stop)]
        if not items:
            return _StepOut([], [])
        logits = self._decode(items, plan.hidden)
        states = self._hidden_rows() if plan.hidden else None
        samples, hidden, row = [], [], 0
        for job, (drafted, q) in zip(plan.decodes, proposals):
            samples.append(self._verify(logits[row: row + len(drafted) + 1], drafted, q, job))
            keep = states is not None and job.params.hidden
            hidden.append(states[row: row + len(samples[-1])].copy() if keep else None)
            row += len(drafted) + 1
        feed_logprobs, feed_hidden = [], []
        for feed, start, stop in plan.feeds:
            if feed.want_logprobs:
                feed_logprobs.append(sum(token_logprob(logits[row + k - start], feed.targets[k])
                                         for k in range(start, stop)))
            if feed.want_hidden:
                feed_hidden.append(states[row + stop - start - 1].copy())
            if feed.want_logprobs or feed.want_hidden:
                row += stop - start
        return _StepOut(samples, feed_logprobs, hidden, feed_hidden)

    def _verify(self, rows: np.ndarray, drafted: list[int], q: list, job: _Extend) -> list[Sample]:
        """The tokens a decode gives one branch: plain sampling from the first row, or the draft's proposals kept
        by modified rejection sampling, then the target's own correction (or, all kept, one bonus token)."""
        params, rng = job.params, job.branch.rng
        out = []
        for i, token in enumerate(drafted):
            choice = speculative_choice(distribution(rows[i], params), q[i], token, rng)
            if choice is not None:
                return out + [describe(rows[i], choice, params)]
            out.append(describe(rows[i], token, params))
        return out + [sample(rows[len(drafted)], params, rng)]

    def _propose(self, plan: _StepPlan) -> list[tuple[list[int], list]]:
        """The draft model's proposals for each decode of the target's ``plan``: k draft decodes, every branch in
        each. Returns per decode the drafted tokens and the draft distribution each was drawn from."""
        self._apply_kv_ops(plan.draft_kv_ops)
        proposals = [([], []) for _ in plan.decodes]
        for r in range(max(plan.drafts)):
            items, who = [], []
            for j, (job, k) in enumerate(zip(plan.decodes, plan.drafts)):
                if r >= k:
                    continue
                b, shadow = job.branch, job.branch.shadow
                # First round: the tokens the shadow has not evaluated yet, then the target's pending token.
                new = [*b.draft_behind, b.pending] if r == 0 else [proposals[j][0][-1]]
                start = shadow.n_past + (0 if r == 0 else len(b.draft_behind) + r)
                items += [(token, start + i, shadow.seq_id, i == len(new) - 1) for i, token in enumerate(new)]
                who.append(j)
            logits = self._decode(items)
            for row, j in enumerate(who):
                job = plan.decodes[j]
                q = distribution(logits[row], job.params)
                token = int(q[0][0]) if q[0].size == 1 else draw(*q, job.branch.rng)
                proposals[j][0].append(token)
                proposals[j][1].append(q)
        return proposals

    # ---- back on the event loop: bookkeeping --------------------------------------------------------------------

    def apply(self, plan: _StepPlan, out: _StepOut) -> None:
        if plan.decodes or plan.feeds:  # a step may carry only KV operations
            self.counters.decode_steps += 1
        for i, (job, new) in enumerate(zip(plan.decodes, out.samples)):
            b = job.branch
            if b.job is not job:  # released while the step ran
                continue
            start, entered = b.n_past, []
            states = out.hidden[i] if out.hidden else None
            for k, s in enumerate(new):
                entered.append(b.pending)
                if states is not None:  # row k read the pending token: the branch's tokens so far
                    b.hidden_state, b.hidden_len = states[k], len(b.tokens)
                if self._take(job, s):
                    break
            if plan.drafts:
                self._settle_speculation(b, start, entered, plan.drafts[i], accepted=len(new) - 1)
        sums, states = iter(out.feed_logprobs), iter(out.feed_hidden)
        for feed, start, stop in plan.feeds:
            if feed.want_logprobs:
                feed.logprob += next(sums)
            if feed.want_hidden:
                feed.hidden = next(states)
            if feed not in self._feeding:  # released while the step ran
                continue
            fed = stop - start
            feed.done = stop
            feed.branch.n_past += fed
            feed.branch.segment.cells += fed
            self._cells_used += fed
            self._cells_reserved -= fed
            feed.reserved -= fed
            if feed.done == len(feed.tokens):
                self._feeding.remove(feed)
                if not feed.future.done():
                    feed.future.set_result(None)

    def _take(self, job: _Extend, s: Sample) -> bool:
        """The branch's pending token entered the cells and ``s`` is its next one; True when the extend ended."""
        b = job.branch
        b.last_read = b.pending
        b.n_past += 1
        b.segment.cells += 1
        self._cells_used += 1
        self._cells_reserved -= 1
        job.reserved -= 1
        job.remaining -= 1
        b.pending = s.token
        b.context_tokens = b.n_past + 1
        if not job.params.ignore_eos and llama.llama_vocab_is_eog(self._vocab, s.token):
            self._finish(job, "stop")  # the end token is not part of the text, nor counted as generated
            return True
        b.usage.add("generated_tokens", 1, self.model.name)
        self.counters.generated_tokens += 1
        piece = self._append_token(b, s.token)
        if s.logprob is not None:
            b.token_logprobs.append(s.logprob)
        if s.confidence is not None:
            b.confidences.append(s.confidence)
            b.entropies.append(s.entropy)
        if job.params.stop and self._matched_stop(b, job, len(piece)):
            self._finish(job, "stop")
        elif job.remaining == 0:
            self._finish(job, "length")
        elif job.stop_if is not None and job.stop_if(b):
            self._finish(job, "halted")
        else:
            return False
        return True

    def _settle_speculation(self, b: LlamaBranch, start: int, entered: list[int], drafted: int,
                            accepted: int) -> None:
        """After a speculative step of ``b`` that began with ``start`` tokens in its cells and put ``entered`` into
        them: drop the target's and the draft's cells past what was kept, remember what the draft has yet to
        evaluate, adapt k, count."""
        draft, shadow = self.draft, b.shadow
        self._kv_ops.append(("rm_from", b.seq_id, b.n_past))  # the target wrote start .. start + drafted
        backlog = b.draft_behind + entered  # the target's tokens at positions shadow.n_past .. b.n_past - 1
        # The shadow wrote its backlog, the pending token and drafted - 1 proposals: keep what the target kept.
        written_to = start + drafted if drafted else shadow.n_past
        keep = min(b.n_past, written_to)
        draft._kv_ops.append(("rm_from", shadow.seq_id, keep))
        grown = keep - shadow.n_past
        shadow.n_past = keep
        shadow.segment.cells += grown
        draft._cells_used += grown
        b.draft_behind = backlog[grown:]
        if drafted:
            b.draft_k = min(DRAFT_K_MAX, b.draft_k + 2) if accepted == drafted else max(1, b.draft_k - 1)
            b.usage.add("drafted_tokens", drafted, draft.model.name)
            b.usage.add("accepted_tokens", accepted, draft.model.name)

    def _matched_stop(self, b: LlamaBranch, job: _Extend, piece_len: int) -> bool:
        longest = max(len(s) for s in job.params.stop)
        window_start = max(job.text_start, len(b.text) - piece_len - longest + 1)
        for stop in job.params.stop:
            if b.text.find(stop, window_start) >= 0:
                b.matched_stop = stop
                return True
        return False

    def _finish(self, job: _Extend, reason: str) -> None:
        b = job.branch
        b.finish_reason = reason
        b.job = None
        self._decoding.remove(job)
        self._cells_reserved -= job.reserved
        job.reserved = 0
        if not job.future.done():
            job.future.set_result(b)


class LlamaCppEngine(Engine):
    """Every model of a process on one scheduler and one worker thread; see the module docstring."""

    def __init__(self, model: ModelInfo, *, draft: ModelInfo | None = None, n_ctx: int = 32768,
                 n_seq_max: int = 64, n_batch: int = 512, n_threads: int | None = None, seed: int | None = None,
                 stall_timeout_s: float = 60.0, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS):
        if prefix_cache_tokens < 0:
            raise PonderError(f"prefix_cache_tokens must be 0 (no prefix cache) or more, got {prefix_cache_tokens}")
        self.model = model
        self.seed = seed
        self.stall_timeout_s = stall_timeout_s
        self._runner_options = dict(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch,
                                    n_threads=n_threads or os.cpu_count() or 1,
                                    prefix_cache_tokens=prefix_cache_tokens)
        quiet_llama_log()
        llama.llama_backend_init()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponder-decode")
        self._runners: dict[str, _ModelRunner] = {}
        self._loading: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        target = self._load(model)
        if draft is not None:
            if draft.name == model.name:
                raise PonderError(f"the draft model must differ from the target ({model.name})")
            draft_runner = self._load(draft, margin=n_seq_max * (DRAFT_K_MAX + 2))
            if draft_runner.n_vocab != target.n_vocab:
                raise PonderError(f"{draft.name} cannot draft for {model.name}: their vocabularies differ "
                                  f"({draft_runner.n_vocab} and {target.n_vocab} tokens)")
            target.draft = draft_runner
            # No prefix cache of the draft's own: the target's cached prompts keep their shadows' KV too.
            draft_runner.prefix_cache = None
        self.draft = draft

    def _load(self, model: ModelInfo, margin: int = 0) -> _ModelRunner:
        options = dict(self._runner_options)
        options["n_ctx"] += margin
        runner = _ModelRunner(self, model, **options)
        self._runners[model.name] = runner
        return runner

    async def _runner_for(self, name: str | None) -> _ModelRunner:
        """The runner of model ``name`` (a bundled name or GGUF path), loaded on the worker the first time."""
        if name is None:
            return self._runners[self.model.name]
        if name in self._runners:
            return self._runners[name]
        from ..models import resolve_model

        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            loop = asyncio.get_running_loop()
            info = await loop.run_in_executor(self._executor, resolve_model, name)
            if info.name not in self._runners:
                runner = await loop.run_in_executor(self._executor, self._load, info)
                if runner.n_vocab != self._default.n_vocab:
                    del self._runners[info.name]
                    runner.close()
                    raise PonderError(f"{info.name} and {self.model.name} do not share a vocabulary; one engine "
                                      f"only holds models that do")
            self._runners[name] = self._runners[info.name]
            return self._runners[name]

    @property
    def _default(self) -> _ModelRunner:
        return self._runners[self.model.name]

    # The default model's text functions and sizes (benchmarks and tools read them).
    def format_chat(self, messages: Sequence[Message]) -> str:
        return self._default.format_chat(messages)

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        return self._default.tokenize(text, special=special, add_bos=add_bos)

    def token_text(self, token: int, *, special: bool = False) -> str:
        return self._default.token_text(token, special=special)

    @property
    def n_vocab(self) -> int:
        return self._default.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._default.n_ctx

    @property
    def n_seq_max(self) -> int:
        return self._default.n_seq_max

    @property
    def n_batch(self) -> int:
        return self._default.n_batch

    @property
    def _loaded(self) -> list[_ModelRunner]:
        """Each loaded model's runner once (a model asked for by its path is also listed under its name)."""
        return list(dict.fromkeys(self._runners.values()))

    # ---- the Branch API --------------------------------------------------------------------------------------

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        runner = await self._runner_for(model)
        # Rendering and tokenizing grow with the prompt: off the event loop, which keeps answering other clients.
        # llama_tokenize only reads the vocabulary (and ctypes releases the GIL), so it may run beside a decode.
        tokens = await asyncio.to_thread(runner.prompt_tokens, prompt)
        return await runner.open(tokens, usage if usage is not None else Usage())

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.fork(branch, n)

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.extend(branch, params, stop_if)

    async def append(self, branch: Branch, text: str) -> Branch:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.append(branch, text)

    async def score(self, branch: Branch, continuation: str) -> float:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.score(branch, continuation)

    async def hidden(self, branch: Branch) -> np.ndarray:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.hidden(branch)

    def model_info(self, name: str | None = None) -> ModelInfo:
        """The ModelInfo of a loaded model (by the name a branch carries; None: the default model)."""
        return self._runners[name or self.model.name].model

    def release(self, branch: Branch) -> None:
        assert isinstance(branch, LlamaBranch)
        branch.runner.release(branch)

    def prefix_cache_tokens(self, model: str | None = None) -> int:
        """Prompt tokens whose KV the prefix cache of ``model`` (default: the engine's model) keeps."""
        cache = self._runners[model or self.model.name].prefix_cache
        return cache.tokens() if cache is not None else 0

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt of every model."""
        for runner in self._loaded:
            if runner.prefix_cache is not None:
                runner.prefix_cache.clear()

    def stats(self) -> EngineStats:
        total = EngineStats()
        for runner in self._loaded:
            s = runner.stats()
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return total

    def close(self) -> None:
        if self._runners:
            self._executor.shutdown(wait=True)
            for runner in self._loaded:
                runner.close()
            self._runners = {}

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the scheduler: every model's steps, one at a time, on the one worker ----------------------------------

    def new_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def kick(self) -> None:
        """Make sure the scheduling task runs (it exits whenever there is nothing to do)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        while True:
            runners = self._loaded
            for runner in runners:
                runner.admit()
            busy = [r for r in runners if r.busy]
            if not busy:
                if not any(r.blocked for r in runners):
                    return
                # Waiting jobs need room that only a release can make. If none comes, every cell is held by idle
                # branches that their owner waits to release until these jobs finish: fail loudly, do not hang.
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.stall_timeout_s)
                except TimeoutError:
                    for r in runners:
                        r.fail_waiting(PonderError(
                            f"the KV cache is full ({r.model.name}: {r._cells_used} of {r.n_ctx} cells held by "
                            f"branches that are not generating) and nothing was released for "
                            f"{self.stall_timeout_s:g} s: release finished branches, lower max_tokens or the number "
                            f"of branches, or raise n_ctx"))
                continue
            for runner in busy:  # one step of each model in turn: their batches interleave on the one worker
                plan = runner.plan()
                step = loop.run_in_executor(self._executor, runner.step, plan)
                try:
                    # shield: if this task is cancelled the worker still finishes its decode before the next one
                    out = await asyncio.shield(step)
                except asyncio.CancelledError:
                    await self._cancelled(runner, plan, step)
                    raise
                except Exception as exc:  # the jobs' futures carry the error to their callers
                    self._fail_all(exc if isinstance(exc, EngineError) else EngineError(f"decode failed: {exc!r}"))
                    return
                runner.apply(plan, out)

    async def _cancelled(self, runner: _ModelRunner, plan: _StepPlan, step: asyncio.Future) -> None:
        """The scheduling task was cancelled, most often because ``asyncio.run`` ends while a last step (the KV
        operations of a release) is on the worker. Let that step finish, so that the KV cache is in a known state, and
        fail only the jobs still in flight: the prefix cache stays for the engine's next event loop."""
        try:
            runner.apply(plan, await step)
        except Exception as exc:
            self._fail_all(EngineError(f"decode failed: {exc!r}"))
            return
        if any(r._decoding or r._feeding or r._waiting for r in self._loaded):
            self._fail_all(EngineError("the engine loop was cancelled"))

    def _fail_all(self, exc: BaseException) -> None:
        for runner in self._loaded:
            runner.fail_all(exc)
