"""The prefix cache's bookkeeping (no model): the tree of KV cell segments, longest-prefix lookup, LRU and budget."""

from __future__ import annotations

import numpy as np
import pytest

from ponder.engine.prefix_cache import PrefixCache, Segment, common_prefix, drop


def test_cells_are_freed_when_their_last_holder_lets_go():
    prompt = Segment(cells=10)
    prompt.holders += 2  # a fork: two children and the parent's new segment hang under the prompt
    children = [Segment(cells=3, parent=prompt) for _ in range(2)]
    parent_rest = Segment(cells=1, parent=prompt)
    assert drop(children[0]) == 3
    assert drop(parent_rest) == 1
    assert drop(children[1]) == 3 + 10  # the last one frees the shared prompt too
    assert prompt.holders == 0


def test_common_prefix():
    a = np.array([1, 2, 3, 4], dtype=np.int32)
    assert common_prefix(a, np.array([1, 2, 9], dtype=np.int32)) == 2
    assert common_prefix(a, a[:3]) == 3
    assert common_prefix(a, np.array([7], dtype=np.int32)) == 0


def values(cache: PrefixCache) -> list[list[int]]:
    return [entry.tokens.tolist() for entry in cache._entries]


def test_longest_prefix_wins_and_becomes_most_recently_used():
    cache = PrefixCache(budget=100)
    for tokens in ([1, 2, 3], [1, 2, 7, 8], [5, 6]):
        assert cache.add(tokens) is not None
    entry, n = cache.longest([1, 2, 7, 9])
    assert (entry.tokens.tolist(), n) == ([1, 2, 7, 8], 3)
    entry, n = cache.longest([1, 2, 3, 4, 5])
    assert (entry.tokens.tolist(), n) == ([1, 2, 3], 3)
    assert cache.longest([9, 9]) == (None, 0)
    assert values(cache) == [[5, 6], [1, 2, 7, 8], [1, 2, 3]]  # least recently used first


def test_a_prompt_is_not_kept_twice():
    cache = PrefixCache(budget=100)
    cache.add([1, 2, 3, 4])
    assert cache.add([1, 2]) is None  # already inside [1, 2, 3, 4]: nothing to copy out
    longer = cache.add([1, 2, 3, 4, 5, 6])  # [1, 2, 3, 4] is inside it and gives way
    assert longer is not None and values(cache) == [[1, 2, 3, 4, 5, 6]]
    assert longer.states == [None, None]  # the engine's worker fills the copies in


def test_the_budget_evicts_least_recently_used_tokens():
    cache = PrefixCache(budget=10)
    cache.add([1] * 4)
    cache.add([2] * 4)
    cache.longest([1])  # [1]*4 is used again
    cache.add([3] * 5)  # 13 tokens > 10: the least recently used, [2]*4, goes
    assert values(cache) == [[1] * 4, [3] * 5] and cache.tokens() == 9


def test_a_prompt_larger_than_the_budget_is_not_kept():
    cache = PrefixCache(budget=5)
    cache.add([1, 2, 3])
    assert cache.add(list(range(10, 20))) is None
    assert values(cache) == [[1, 2, 3]]


def test_clear_forgets_everything():
    cache = PrefixCache(budget=100)
    for i in range(3):
        cache.add([i, i])
    cache.clear()
    assert len(cache) == 0 and cache.tokens() == 0 and cache.longest([0, 0]) == (None, 0)


def test_a_budget_below_one_token_is_refused():
    with pytest.raises(ValueError):
        PrefixCache(budget=0)
