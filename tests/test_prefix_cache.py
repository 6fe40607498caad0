"""The prefix cache's bookkeeping (no model): the tree of KV cell segments, longest-prefix lookup, LRU and budget."""

from __future__ import annotations

import pytest

from ponder.engine.prefix_cache import PrefixCache, Segment, chain_cells, common_prefix, drop, prefix_of


def chain(*cells: int) -> Segment:
    """A chain of segments of these sizes, each held once; returns the last."""
    last = None
    for n in cells:
        last = Segment(cells=n, parent=last)
    return last


def test_cells_are_freed_when_their_last_holder_lets_go():
    prompt = Segment(cells=10)
    prompt.holders += 2  # a fork: two children and the parent's new segment hang under the prompt
    children = [Segment(cells=3, parent=prompt) for _ in range(2)]
    parent_rest = Segment(cells=1, parent=prompt)
    assert drop(children[0]) == 3
    assert drop(parent_rest) == 1
    assert drop(children[1]) == 3 + 10  # the last one frees the shared prompt too
    assert prompt.holders == 0


def test_prefix_of_splits_a_segment_so_that_both_holders_stay_right():
    last = chain(4, 6)  # cells 0..3 and 4..9
    head = prefix_of(last, 7)  # a new sequence shares cells 0..6
    assert chain_cells(head) == 7 and chain_cells(last) == 10
    assert last.cells == 3 and last.parent is head and head.cells == 3
    head.holders += 1  # the new sequence's hold
    assert drop(last) == 3  # the old sequence goes: only its cells 7..9 are freed
    assert drop(head) == 7  # then the new one: everything


def test_prefix_of_at_a_boundary_or_the_end_returns_an_existing_segment():
    last = chain(4, 6)
    assert prefix_of(last, 10) is last
    assert prefix_of(last, 4) is last.parent
    assert prefix_of(last, 0) is None
    assert chain_cells(last) == 10 and last.cells == 6  # nothing was split
    with pytest.raises(ValueError):
        prefix_of(last, 11)


def test_common_prefix():
    import numpy as np

    a = np.array([1, 2, 3, 4], dtype=np.int32)
    assert common_prefix(a, np.array([1, 2, 9], dtype=np.int32)) == 2
    assert common_prefix(a, a[:3]) == 3
    assert common_prefix(a, np.array([7], dtype=np.int32)) == 0


class Recorder:
    """A cache whose forgotten entries are recorded (by their value) and whose cells are dropped like the engine's."""

    def __init__(self, budget: int):
        self.forgotten: list[str] = []
        self.freed = 0
        self.cache = PrefixCache(budget, self.forget)

    def forget(self, entry) -> None:
        self.forgotten.append(entry.value)
        self.freed += drop(entry.last)


def test_longest_prefix_wins_and_becomes_most_recently_used():
    r = Recorder(budget=100)
    r.cache.add([1, 2, 3], chain(3), "a")
    r.cache.add([1, 2, 7, 8], chain(4), "b")
    r.cache.add([5, 6], chain(2), "c")
    entry, n = r.cache.longest([1, 2, 7, 9])
    assert (entry.value, n) == ("b", 3)
    entry, n = r.cache.longest([1, 2, 3, 4, 5])
    assert (entry.value, n) == ("a", 3)
    assert r.cache.longest([9, 9]) == (None, 0)
    r.cache.evict_oldest()  # "c" was used least recently: the hits moved "a" and "b" after it
    assert r.forgotten == ["c"]


def test_a_prompt_is_not_kept_twice():
    r = Recorder(budget=100)
    r.cache.add([1, 2, 3, 4], chain(4), "long")
    r.cache.add([1, 2], chain(2), "prefix of long")  # already inside "long"
    assert r.forgotten == ["prefix of long"] and len(r.cache) == 1
    r.cache.add([1, 2, 3, 4, 5, 6], chain(6), "longer")  # "long" is inside it: "long" gives way
    assert r.forgotten == ["prefix of long", "long"] and len(r.cache) == 1
    assert r.cache.longest([1, 2, 3, 4, 5, 6])[0].value == "longer"


def test_the_budget_evicts_least_recently_used_and_counts_shared_cells_once():
    r = Recorder(budget=20)
    shared = Segment(cells=10)  # a few-shot prefix that two cached prompts share (as the engine builds them)
    shared.holders += 1
    a, b = Segment(cells=4, parent=shared), Segment(cells=4, parent=shared)
    r.cache.add([0] * 10 + [1] * 4, a, "a")
    r.cache.add([0] * 10 + [2] * 4, b, "b")
    assert r.cache.cells() == 18 and r.forgotten == []
    r.cache.longest([0] * 10 + [1])  # "a" is used again
    r.cache.add([3] * 5, chain(5), "c")  # 23 cells > 20: the least recently used, "b", goes
    assert r.forgotten == ["b"] and r.freed == 4  # only b's own cells: the prefix is still a's
    assert r.cache.cells() == 19


def test_a_prompt_larger_than_the_budget_is_not_kept():
    r = Recorder(budget=5)
    r.cache.add([1, 2, 3], chain(3), "small")
    r.cache.add(list(range(10, 20)), chain(10), "huge")
    assert r.forgotten == ["small", "huge"] and len(r.cache) == 0 and r.freed == 13


def test_clear_forgets_everything():
    r = Recorder(budget=100)
    for i in range(3):
        r.cache.add([i, i], chain(2), i)
    r.cache.clear()
    assert r.forgotten == [0, 1, 2] and len(r.cache) == 0 and r.cache.cells() == 0
    with pytest.raises(ValueError):
        PrefixCache(0, r.forget)
