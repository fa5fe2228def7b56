"""LazyHeap: re-ranked and withdrawn entries, and the k smallest live ones in order."""

from __future__ import annotations

import random

from runtime.memory.lazy_heap import LazyHeap


def test_smallest_is_the_k_smallest_live_entries_in_order_whatever_was_pushed_and_dropped():
    for trial in range(50):
        rng = random.Random(trial)
        heap: LazyHeap[str] = LazyHeap()
        keys = [f"k{i}" for i in range(rng.randint(1, 150))]
        for _ in range(rng.randint(1, 1500)):
            key, r = rng.choice(keys), rng.random()
            if r < 0.6:  # (re-)rank, ties and infinities included
                rank = rng.choice([rng.random(), 0.5, float("inf")])
                heap.push((rank, heap.versions.stamp(key), key))
            elif r < 0.7:
                heap.versions.drop(key)
            elif r < 0.8:
                heap.pop()
            else:
                k = rng.randint(0, 60)
                assert heap.smallest(k) == sorted(heap.live())[:k]
                skip = set(rng.sample(keys, rng.randint(0, len(keys))))
                assert heap.smallest(k, skip) == [e for e in sorted(heap.live())
                                                  if e[-1] not in skip][:k]


def test_smallest_leaves_the_heap_as_it_pops():
    heap: LazyHeap[int] = LazyHeap()
    for k in range(100):
        heap.push((100 - k, heap.versions.stamp(k), k))
    for k in range(0, 100, 2):  # half re-ranked: their first entries are dead
        heap.push((k / 1000, heap.versions.stamp(k), k))
    first = heap.smallest(10)
    assert heap.smallest(10) == first and [e[-1] for e in first] == list(range(0, 20, 2))
    popped = [heap.pop() for _ in range(100)]
    assert [e[-1] for e in popped] == list(range(0, 100, 2)) + list(range(99, 0, -2))
    assert heap.pop() is None
