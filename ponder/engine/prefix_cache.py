"""Bookkeeping of the in-process engine's KV cells, and the prefix cache that keeps finished prompts' cells.

Pure Python and numpy, no llama.cpp: the engine (``llamacpp.py``) turns these decisions into KV operations.

**Segments: the tree of KV cells.** A ``Segment`` is a run of cells one sequence wrote between two branching points.
A branch holds the segment it writes into; every segment holds its ``parent``, the segment of the cells before it. So
the segments of all branches form a tree whose paths from the root are the branches' token prefixes -- the radix tree
of SGLang's RadixAttention, over KV cells: a fork's children hang under their parent's last segment and share every
cell above it, each cell is counted once however many sequences share it, and a segment's cells are free once its
last holder (a branch, a child segment or a cached prompt) lets go (``drop``). ``prefix_of`` cuts a segment in two
where a new sequence shares only the first part of another's cells.

**The prefix cache.** When a request's root branch is released, its prompt's cells need not be: the engine keeps them
under the sequence id the root had and adds the prompt here. A new prompt asks for the cached prompt that shares its
longest prefix (``longest``); the engine copies that sequence's cells ``[0, n)`` to the new sequence (with a unified
KV cache ``llama_memory_seq_cp`` shares cells, it copies nothing) and evaluates only the rest, as llama.cpp's server
does with its slots' prompt cache. The cache is bounded by ``budget`` cells (counted once, shared or not) and gives
back the least recently used prompt first; the engine also evicts whenever a job needs cells or a sequence id that
only cached prompts hold, so a request never waits for the cache.

Why a list, not a token trie: a cached prompt holds a sequence id of its context (llama.cpp keeps a cell only while a
sequence holds it), so there are never more than ``n_seq_max`` of them (64 by default). Comparing a new prompt with
each of them in numpy takes microseconds, against the milliseconds of one decode step; and the sharing a trie would
give exists anyway one level down, in the segments: a prompt evaluated on top of a cached prefix hangs under that
prefix's segments, so the common cells exist once. A prompt that another cached prompt starts with is not kept twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

PREFIX_CACHE_TOKENS = 8192  # default budget of the prefix cache, in cells of each model's context


@dataclass(eq=False)
class Segment:
    """A run of KV cells, following the cells of ``parent``; ``holders`` counts who keeps it alive."""

    cells: int = 0
    parent: Segment | None = None
    holders: int = 1


def chain_cells(last: Segment | None) -> int:
    """Cells from the start of the sequence through ``last``: the length of the prefix it ends."""
    total = 0
    while last is not None:
        total += last.cells
        last = last.parent
    return total


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


def prefix_of(last: Segment, n: int) -> Segment | None:
    """The segment that ends exactly after the first ``n`` cells of ``last``'s chain (``None`` for ``n == 0``),
    splitting the segment that holds cell ``n`` in two when ``n`` falls inside it. The caller adds its own hold."""
    end = chain_cells(last)
    if not 0 <= n <= end:
        raise ValueError(f"a prefix of {n} cells of a chain of {end}")
    segment = last
    while segment is not None:
        start = end - segment.cells
        if n == end:
            return segment
        if start < n:  # n falls inside: the head keeps the first part, this segment the rest
            head = Segment(cells=n - start, parent=segment.parent, holders=1)
            segment.parent, segment.cells = head, end - n
            return head
        segment, end = segment.parent, start
    return None


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


@dataclass(eq=False)
class CachedPrompt:
    tokens: np.ndarray  # the tokens whose cells are kept, positions 0 .. len - 1
    last: Segment  # the last segment of those cells
    value: Any  # what the engine needs to reuse and free them (its sequence ids)


class PrefixCache:
    """Cached prompts, least recently used first, at most ``budget`` cells in all; ``forget(entry)`` frees an entry's
    cells and sequence ids when it leaves (the engine's part)."""

    def __init__(self, budget: int, forget: Callable[[CachedPrompt], None]):
        if budget < 1:
            raise ValueError(f"a prefix cache needs a budget of at least one cell, got {budget}")
        self.budget = budget
        self._forget = forget
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

    def add(self, tokens: Sequence[int], last: Segment, value: Any) -> None:
        """Keep a prompt's cells. A prompt already cached (alone or at the start of a longer one) is not kept twice,
        and cached prompts that the new one starts with give way to it. Then the least recently used prompts leave
        until the cache fits its budget (the new one too, if it alone is larger)."""
        new = CachedPrompt(np.asarray(tokens, dtype=np.int32), last, value)
        for entry in list(self._entries):
            n = common_prefix(entry.tokens, new.tokens)
            if n == len(new.tokens):
                self._touch(entry)
                self._forget(new)
                return
            if n == len(entry.tokens):
                self._entries.remove(entry)
                self._forget(entry)
        self._entries.append(new)
        while self.cells() > self.budget:
            self.evict_oldest()

    def evict_oldest(self) -> bool:
        """Free the least recently used prompt; False when the cache is empty."""
        if not self._entries:
            return False
        self._forget(self._entries.pop(0))
        return True

    def clear(self) -> None:
        while self.evict_oldest():
            pass

    def cells(self) -> int:
        """Distinct cells the cached prompts keep (cells shared between prompts count once)."""
        seen: set[Segment] = set()
        total = 0
        for entry in self._entries:
            segment = entry.last
            while segment is not None and segment not in seen:
                seen.add(segment)
                total += segment.cells
                segment = segment.parent
        return total

    def _touch(self, entry: CachedPrompt) -> None:
        self._entries.remove(entry)
        self._entries.append(entry)
