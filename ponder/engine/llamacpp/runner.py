"""The in-process engine's model runner: one model's sequences, KV admission and step loop, and the Branch operations
on them (see the package docstring for how the engine works).

A runner never decodes on its own: the scheduler asks it to ``plan`` a step, runs ``step`` on the one worker thread,
and hands the result to ``apply`` back on the event loop. ``LlamaContext`` does the llama.cpp calls of a step,
``speculative`` the draft model's part.

One class of some 500 lines, on purpose: the Branch operations, admission and the step loop all keep the same KV
accounting (cells used and reserved, segments, free sequence ids, the queues of jobs), whose invariants hold only
when they change together; split into several classes, no one file would show them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import llama_cpp as llama
import numpy as np

from ..base import (Branch, EngineStats, Message, ModelInfo, PonderError, PromptTooLongError, SamplingParams, StopIf,
                    Usage)
from ..prefix_cache import CachedPrompt, PrefixCache, Segment, drop
from ..sampling import Sample, token_logprob
from ..tokens import end_reason, record_token
from .context import LlamaContext
from .jobs import Extend, Feed, LlamaBranch, StepOut, StepPlan
from .speculative import propose, settle, verify

if TYPE_CHECKING:  # annotations only: the engine and the scheduler import this module
    from .engine import LlamaCppEngine
    from .scheduler import Scheduler


class ModelRunner:
    """One model: its llama.cpp context, sequence ids, queues and KV accounting, and the Branch operations on it."""

    def __init__(self, engine: LlamaCppEngine, scheduler: Scheduler, model: ModelInfo, *, n_ctx: int, n_seq_max: int,
                 n_batch: int, n_threads: int, prefix_cache_tokens: int):
        self.engine = engine
        self.scheduler = scheduler
        self.model = model
        self.context = LlamaContext(model, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, n_threads=n_threads)
        self.vocab = self.context.vocab
        self.n_vocab, self.n_embd = self.context.n_vocab, self.context.n_embd
        self.n_ctx, self.n_batch = self.context.n_ctx, self.context.n_batch
        self._seeds = np.random.SeedSequence(engine.seed)
        self.draft: ModelRunner | None = None  # set when this model is the target of speculative decoding

        self.n_seq_max = n_seq_max
        self._free_seqs = deque(range(n_seq_max))
        self._seq_waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._waiting: deque[Extend | Feed] = deque()
        self._decoding: list[Extend] = []
        self._feeding: list[Feed] = []
        self.kv_ops: list[tuple] = []
        self.cells_used = 0
        self._cells_reserved = 0
        self._live: set[LlamaBranch] = set()
        self.counters = EngineStats(kv_cells_total=self.n_ctx)
        # A draft model has none of its own: a target's cached prompt keeps its shadow's KV too.
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None

    def prompt_tokens(self, prompt: str | Sequence[Message]) -> list[int]:
        text = prompt if isinstance(prompt, str) else self.vocab.format_chat(prompt)
        tokens = self.vocab.tokenize(text, add_bos=llama.llama_vocab_get_add_bos(self.vocab.handle))
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
            self.kv_ops.append(("load", seq, hit, int(shadow), reused))
            self.cells_used += reused
            usage.add("prompt_tokens_cached", reused, self.model.name)
        root = LlamaBranch(engine=self.engine, usage=usage, context_tokens=len(tokens), model=self.model.name,
                           runner=self, seq_id=seq, pending=tokens[-1], n_past=reused, segment=Segment(cells=reused),
                           prompt_ids=tokens, seeds=self._seeds.spawn(1)[0], is_shadow=shadow)
        root.rng = np.random.default_rng(root.seeds)
        self._live.add(root)
        return root

    async def _feed(self, branch: LlamaBranch, tokens: list[int]) -> None:
        if tokens:
            feed = Feed(branch, tokens, self.scheduler.new_future(), want_logprobs=False)
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
            self.kv_ops.append(("cp", branch.seq_id, seq, -1))
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
        job = Extend(branch, params, stop_if, self.scheduler.new_future(), remaining=params.max_tokens,
                      text_start=len(branch.text))
        branch.job = job
        await self._submit(job, cells=params.max_tokens)
        return branch

    async def append(self, branch: LlamaBranch, text: str) -> Branch:
        if branch.job is not None:
            raise PonderError("cannot append to a branch while it is extending")
        tokens = self.vocab.tokenize(text)
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
        targets = self.vocab.tokenize(continuation, special=False)
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
        self.kv_ops.append(("cp", branch.seq_id, seq, -1))
        self._live.add(probe)
        # Feeding [pending, t0 .. t(m-2)] yields the distributions that predict t0 .. t(m-1).
        feed = Feed(probe, [branch.pending] + targets[:-1], self.scheduler.new_future(), want_logprobs=True,
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
        eog = llama.llama_vocab_is_eog(self.vocab.handle, branch.pending)
        if eog and branch.last_read < 0:
            raise PonderError("this branch holds no token whose hidden state could be read")
        token, keep = (branch.last_read, branch.n_past - 1) if eog else (branch.pending, branch.n_past)
        (seq,) = await self._take_seqs(1)
        branch.segment.holders += 1
        probe = LlamaBranch(engine=self.engine, usage=branch.usage, context_tokens=branch.context_tokens,
                            model=branch.model, runner=self, seq_id=seq, n_past=keep,
                            segment=Segment(parent=branch.segment))
        self.kv_ops.append(("cp", branch.seq_id, seq, keep if eog else -1))
        self._live.add(probe)
        feed = Feed(probe, [token], self.scheduler.new_future(), want_logprobs=False, want_hidden=True)
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
                self.kv_ops.append(("save", branch.seq_id, entry, 0))
                if branch.shadow is not None:
                    self.draft.kv_ops.append(("save", branch.shadow.seq_id, entry, 1))
        self._stop_jobs(branch)
        self._live.discard(branch)
        self.cells_used -= drop(branch.segment) + drop(branch.prompt_end)
        branch.segment = branch.prompt_end = None
        self.kv_ops.append(("rm", branch.seq_id))
        self._return_seqs([branch.seq_id])
        if branch.shadow is not None:
            branch.shadow.release()
        self.scheduler.kick()

    def _cacheable(self, root: LlamaBranch) -> bool:
        """Whether a released root's prompt goes to the prefix cache: it was evaluated and has a token to reuse. A
        shadow's prompt goes with its target's."""
        return (self.prefix_cache is not None and root.prompt_end is not None and not root.is_shadow
                and len(root.prompt_ids) > 1)

    def _has_room(self, cells: int) -> bool:
        """Whether ``cells`` cells are free beyond what live branches hold and admitted jobs may still write."""
        return self.n_ctx - self.cells_used - self._cells_reserved >= cells

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
        for feed in [f for f in (*self._feeding, *self._waiting) if isinstance(f, Feed) and f.branch is branch]:
            (self._feeding if feed in self._feeding else self._waiting).remove(feed)
            self._cells_reserved -= feed.reserved
            if not feed.future.done():
                feed.future.set_exception(PonderError("the branch was released while its prompt was evaluated"))

    def stats(self) -> EngineStats:
        return replace(self.counters, live_branches=sum(1 for b in self._live if not b.is_shadow),
                       kv_cells_used=self.cells_used, waiting=len(self._waiting) + len(self._seq_waiters))

    def close(self) -> None:
        self.context.close()

    # ---- scheduling (on the event loop) ------------------------------------------------------------------------

    async def _take_seqs(self, n: int) -> list[int]:
        if n > self.n_seq_max:
            raise PonderError(f"asked for {n} branches at once; this engine holds at most {self.n_seq_max} "
                              f"(raise n_seq_max)")
        if len(self._free_seqs) >= n and not self._seq_waiters:
            return [self._free_seqs.popleft() for _ in range(n)]
        waiter = self.scheduler.new_future()
        self._seq_waiters.append((n, waiter))
        return await waiter

    def _return_seqs(self, seqs: list[int]) -> None:
        self._free_seqs.extend(seqs)
        while self._seq_waiters and len(self._free_seqs) >= self._seq_waiters[0][0]:
            n, waiter = self._seq_waiters.popleft()
            if not waiter.done():
                waiter.set_result([self._free_seqs.popleft() for _ in range(n)])

    async def _submit(self, job: Extend | Feed, *, cells: int):
        own = job.branch.n_past
        if cells > self.n_ctx - own:
            raise PromptTooLongError(f"needs {cells} KV cells beyond the {own} it holds; the context has "
                                     f"{self.n_ctx} in all")
        self._waiting.append(job)
        job.reserved = 0
        self.scheduler.kick()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.branch.release()  # the caller gave up (client gone, Ctrl-C): free the cells now
            raise

    def admit(self) -> None:
        """Start waiting jobs in FIFO order while the KV cache has room for all they may write."""
        while self._waiting:
            job = self._waiting[0]
            need = job.remaining if isinstance(job, Extend) else len(job.tokens)
            # A draft model's shadows live in the margin of its context (see the module docstring): they only need
            # cells that are free, not unreserved.
            reserved = 0 if job.branch.is_shadow else self._cells_reserved
            if self.n_ctx - self.cells_used - reserved < need:
                break
            self._waiting.popleft()
            job.reserved = need
            self._cells_reserved += need
            (self._decoding if isinstance(job, Extend) else self._feeding).append(job)

    @property
    def busy(self) -> bool:
        return bool(self._decoding or self._feeding or self.kv_ops)

    @property
    def blocked(self) -> bool:
        return bool(self._waiting)

    @property
    def in_flight(self) -> bool:
        """Whether a job runs or waits on this model."""
        return bool(self._decoding or self._feeding or self._waiting)

    def plan(self) -> StepPlan:
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
        ops, self.kv_ops = self.kv_ops, []
        draft_ops = []
        if any(drafts):  # the speculative step uses the draft's cache: its queued operations come first
            draft_ops, self.draft.kv_ops = self.draft.kv_ops, []
        return StepPlan(ops, decodes, feeds, drafts, draft_ops, hidden)

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
        self.kv_ops = [("clear",)]
        self.cells_used = self._cells_reserved = 0

    # ---- the worker thread: one decode and its sampling --------------------------------------------------------

    def step(self, plan: StepPlan) -> StepOut:
        self.context.apply_kv_ops(plan.kv_ops)
        proposals = propose(self.draft, plan) if any(plan.drafts) else [([], [])] * len(plan.decodes)
        items = []
        for job, (drafted, _) in zip(plan.decodes, proposals):
            b = job.branch
            items += [(token, b.n_past + i, b.seq_id, True) for i, token in enumerate([b.pending, *drafted])]
        for feed, start, stop in plan.feeds:
            b = feed.branch
            items += [(feed.tokens[k], b.n_past + k - start, b.seq_id, feed.want_logprobs or feed.want_hidden)
                      for k in range(start, stop)]
        if not items:
            return StepOut([], [])
        logits = self.context.decode(items, plan.hidden)
        states = self.context.hidden_rows() if plan.hidden else None
        samples, hidden, row = [], [], 0
        for job, (drafted, q) in zip(plan.decodes, proposals):
            samples.append(verify(logits[row: row + len(drafted) + 1], drafted, q, job))
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
        return StepOut(samples, feed_logprobs, hidden, feed_hidden)

    # ---- back on the event loop: bookkeeping --------------------------------------------------------------------

    def apply(self, plan: StepPlan, out: StepOut) -> None:
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
                settle(self, b, start, entered, plan.drafts[i], accepted=len(new) - 1)
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
            self.cells_used += fed
            self._cells_reserved -= fed
            feed.reserved -= fed
            if feed.done == len(feed.tokens):
                self._feeding.remove(feed)
                if not feed.future.done():
                    feed.future.set_result(None)

    def _take(self, job: Extend, s: Sample) -> bool:
        """The branch's pending token entered the cells and ``s`` is its next one; True when the extend ended."""
        b = job.branch
        b.last_read = b.pending
        b.n_past += 1
        b.segment.cells += 1
        self.cells_used += 1
        self._cells_reserved -= 1
        job.reserved -= 1
        job.remaining -= 1
        b.pending = s.token
        b.context_tokens = b.n_past + 1
        if not job.params.ignore_eos and llama.llama_vocab_is_eog(self.vocab.handle, s.token):
            self._finish(job, "stop")  # the end token is not part of the text, nor counted as generated
            return True
        b.usage.add("generated_tokens", 1, self.model.name)
        self.counters.generated_tokens += 1
        piece = self.vocab.append_token(b, s.token)
        record_token(b, s.logprob, s.confidence, s.entropy)
        reason = end_reason(b, job.params, job.stop_if, job.text_start, len(piece), job.remaining)
        if reason is None:
            return False
        self._finish(job, reason)
        return True

    def _finish(self, job: Extend, reason: str) -> None:
        b = job.branch
        b.finish_reason = reason
        b.job = None
        self._decoding.remove(job)
        self._cells_reserved -= job.reserved
        job.reserved = 0
        if not job.future.done():
            job.future.set_result(b)
