"""Bookkeeping of the in-process engine's KV cells, and the prefix cache that keeps finished prompts' KV.

Pure Python and numpy, no llama.cpp: the engine (``llamacpp/runner.py``) turns these decisions into KV operations.

**Segments: the tree of KV cells.** A ``Segment`` is a run of cells one sequence wrote between two branching points.
A branch holds the segment it writes into; every segment holds its ``parent``, the segment of the cells before it. So
the segments of all branches form a tree whose paths from the root are the branches' token prefixes -- the radix tree
of SGLang's RadixAttention, over KV cells: a fork's children hang under their parent's last segment and share every
cell above it, each cell is counted once however many sequences share it, and a segment's cells are free once its
last holder (a branch or a child segment) lets go (``drop``).

**The prefix cache** keeps the KV of finished requests' prompts *outside* the decoding context: when a request's root
branch is released, the engine copies its prompt's cells out (``llama_state_seq_get_data``: llama.cpp's own
serialization of a sequence, about 12 KB a token for the 0.5B) into a ``CachedPrompt``, and frees them. A new prompt
asks for the cached prompt that shares its longest prefix (``longest``); the engine copies those bytes into the new
sequence (``llama_state_seq_set_data``, a memory copy of milliseconds where evaluating a 1,000-token prefix takes a
second or more), drops the positions past the shared prefix, and evaluates only the rest. Why not keep the cells in the
context, sharing them with ``llama_memory_seq_cp`` as the first version did: in llama.cpp's unified KV cache every
sequence's attention scans every used cell, so kept cells slowed every decode (``benchmarks/robustness/bench_aging.py``:
0.74 of a fresh engine's speed with 6,361 cached cells, 0.99 once they were dropped). Outside the context they cost
memory only, and they hold no sequence id and no cell that a job could ever wait for.

The cache is bounded by ``budget`` tokens and gives back the least recently used prompt first. A prompt that another
cached prompt starts with is not kept twice. A list, not a token trie: comparing a new prompt with each cached one in
numpy takes microseconds against the milliseconds of one decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PREFIX_CACHE_TOKENS = 8192  # default budget of the prefix cache, in tokens of each model (their KV kept in memory)


@dataclass(eq=False)
class Segment:
    """A run of KV cells, following the cells of ``parent``; ``holders`` counts who keeps it alive."""

    cells: int = 0
    parent: Segment | None = None
    holders: int = 1


def drop(last: Segment | None) -> int:
    """Let go of one hold on ``last``; return how many cells became free (the segments nobody holds any more)."""
    freed = 0
    while last is not None:
        last.holders -= 1
        if last.holders > 0:
            break
        freed += last.cells
        last = last.parent
    return freed


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


@dataclass(eq=False)
class CachedPrompt:
    tokens: np.ndarray  # the tokens whose KV is kept, positions 0 .. len - 1
    # llama.cpp's serialized KV of those tokens, one per context (the model's, then its draft's under speculative
    # decoding); the engine's worker fills them in when it copies the released prompt out, before any copy back in
    states: list = field(default_factory=lambda: [None, None])


class PrefixCache:
    """Cached prompts, least recently used first, at most ``budget`` tokens in all."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"a prefix cache needs a budget of at least one token, got {budget}")
        self.budget = budget
        self._entries: list[CachedPrompt] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, tokens: Sequence[int]) -> tuple[CachedPrompt | None, int]:
        """The cached prompt sharing the longest prefix with ``tokens`` and that prefix's length (``None, 0`` when
        none shares a token). A hit becomes the most recently used."""
        query = np.asarray(tokens, dtype=np.int32)
        best, best_n = None, 0
        for entry in self._entries:
            n = common_prefix(entry.tokens, query)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self._touch(best)
        return best, best_n

    def add(self, tokens: Sequence[int]) -> CachedPrompt | None:
        """A new entry for a prompt, for the engine to fill in; None if the prompt is already cached (alone or at the
        start of a longer one). Cached prompts that the new one starts with give way to it, then the least recently
        used prompts leave until the cache fits its budget (None if the new one alone is larger)."""
        new = CachedPrompt(np.asarray(tokens, dtype=np.int32))
        if len(new.tokens) > self.budget:
            return None
        for entry in list(self._entries):
            n = common_prefix(entry.tokens, new.tokens)
            if n == len(new.tokens):
                self._touch(entry)
                return None
            if n == len(entry.tokens):
                self._entries.remove(entry)
        self._entries.append(new)
        while self.tokens() > self.budget:
            self._entries.pop(0)
        return new

    def clear(self) -> None:
        self._entries.clear()

    def tokens(self) -> int:
        """Tokens the cached prompts keep in all."""
        return sum(len(entry.tokens) for entry in self._entries)

    def _touch(self, entry: CachedPrompt) -> None:
        self._entries.remove(entry)
        self._entries.append(entry)
