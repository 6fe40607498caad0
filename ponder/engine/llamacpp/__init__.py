"""The in-process engine: llama.cpp through llama-cpp-python's low-level API, every live branch in one batch.

How it works, in the manner of llama.cpp's ``batched`` and ``parallel`` examples:

* Each model has one context with many sequences (``n_seq_max``) over one unified KV cache (a ``ModelRunner``). A
  branch is a sequence id of its model's context.
* A prompt is evaluated once (``open``). ``fork`` copies the sequence id onto new ids with ``llama_memory_seq_cp``,
  which *shares* the KV cells (no copy, no recompute). ``release`` drops the id with ``llama_memory_seq_rm``.
  ``append`` evaluates text into a branch as if it had been generated (how text moves from one model to another).
* Each branch keeps one *pending* token: the last token it received, not yet in its KV cells. A step puts the pending
  token of every branch that is extending, plus chunks of prompts waiting to be evaluated, into a single
  ``llama_decode`` call; the logits that come back give every branch its next pending token.
* **One compute worker for every model.** One asyncio task (``Scheduler._run``) plans the steps of every model in
  turn; the decodes and the sampling run on one worker thread, so two models never decode at the same time (two
  llama.cpp thread pools on the same cores slow both down manyfold) and the event loop stays free (the server keeps
  answering while the model computes). Callers are coroutines that wait on futures; all KV operations are queued and
  applied by the worker right before the next decode of their model. Models are loaded on first use, on the worker.
* Admission: a job starts only when its model's KV cache has room for everything it may still write (an extend
  reserves its ``max_tokens``), so a running branch never fails for lack of cells; when the cache is full new jobs
  wait in FIFO order. A job that could never fit is refused at once with a clear error.
* **Prefix cache across requests** (``prefix_cache_tokens``, 0 turns it off): when a root branch is released, its
  prompt's KV is copied out of the context (``llama_state_seq_get_data``) into the cache, outside llama.cpp, and a
  later ``open`` whose prompt starts the same way copies the longest such prefix into its new sequence
  (``llama_state_seq_set_data``, then the positions past the shared prefix are dropped) and evaluates only the rest;
  ``Usage.prompt_tokens_cached`` counts what it reused. Outside the context, because in the unified KV cache every
  sequence's attention scans every used cell: cells kept there slowed every decode
  (``benchmarks/robustness/bench_aging.py``: 0.74 of a fresh engine's speed with 6,361 cached cells, 0.99 once they were
  dropped). So the context holds only live branches, a cached prompt holds no cell or sequence id a job could wait for,
  and a hit costs a memory copy (about 12 KB a token for the 0.5B). The cache keeps at most ``prefix_cache_tokens``
  tokens, least recently used leaving first (``engine/prefix_cache.py``). Under speculative decoding a cached prompt
  keeps its shadow's KV too, copied out of and into the draft's context alongside.
* **Speculative decoding** (``draft=``): a draft model proposes tokens that the target verifies, with exactly the
  target's output distribution (``speculative.py``).
* **Hidden states** (``Branch.hidden``): llama.cpp returns the final hidden state of a decode's output rows (pooling
  NONE) once ``llama_set_embeddings`` is on, but then it makes *every* token of the batch an output row (logits
  included). So embeddings are switched on only for a step whose every token is an output row anyway: the decodes (each
  sampled token is one) and the one-token evaluations ``hidden`` asks for. A step that also evaluates a prompt or
  appended text runs with embeddings off; an extend with ``hidden=True`` then simply keeps no vector for that token (its
  branch's ``hidden`` costs one token later, never a wrong vector). ``benchmarks/performance/bench_hidden.py`` measures
  what the vectors cost per decode.

The modules: ``engine.py`` (``LlamaCppEngine``), ``scheduler.py`` (the task and the worker thread), ``runner.py`` (one
model: its Branch operations, KV admission and step loop), ``context.py`` (its llama.cpp calls), ``vocabulary.py``
(tokens, text, chat template), ``speculative.py``, ``jobs.py`` (branches, jobs and steps as data).
"""

from .engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
