"""A min-heap whose entries can be re-ranked or withdrawn in O(log n): lazy invalidation.

Python's :mod:`heapq` cannot change the rank of an entry in place. :class:`LazyHeap` pushes a new
entry instead and remembers, per key, the *version* of its one live entry; older entries stay in
the heap and are skipped when they surface. Every entry is a tuple whose last two items are
``(version, key)``; what comes before them is the rank (and any tie-breaker), so entries compare
by rank first. The heap is compacted when dead entries outnumber live ones, which keeps its size
within a constant factor of the live keys.

Several heaps may share one :class:`Versions` table (the memory manager's eviction index keeps a
second heap over a subset of the same keys): an entry is live in any of them while its version
is the key's current one.
"""

from __future__ import annotations

import itertools
from bisect import insort
from heapq import heapify, heappop, heappush
from typing import Any, Container, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
Entry = tuple[Any, ...]


class Versions(dict[K, int]):
    """The current version of every live key; a key without one is not in any heap.

    A dict of key -> version: lookups (``key in versions``, ``get``, ``len``) are the dict's
    own, with no Python call in between; the oracle and the eviction index ask them at every
    re-estimate.
    """

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        super().__init__()
        self._counter = itertools.count()

    def stamp(self, key: K) -> int:
        """A new version for ``key``: every older entry of it is dead from now on."""
        version = next(self._counter)
        self[key] = version
        return version

    def drop(self, key: K) -> None:
        self.pop(key, None)

    def is_live(self, entry: Entry) -> bool:
        return self.get(entry[-1]) == entry[-2]  # inlined in LazyHeap's hot methods


class LazyHeap(Generic[K]):
    """Entries ``(*rank, version, key)`` in rank order; dead ones are skipped (module doc).

    The smallest entries that :meth:`smallest` has read are kept apart, in a sorted list (the
    *front*), below everything in the heap proper: the oracle asks for the nearest agents at
    every engine iteration (the prefetch's ``32 + running``, the snapshot's 64), and they are
    mostly the same entries as the time before. Popping them off a heap of 300,000 entries and
    pushing them back cost two O(log n) sifts per entry and call (5% of a 150,000-user run);
    read off the front they cost a liveness test each. A push below the front's largest entry
    joins the front (a short sorted list); every other push goes to the heap. Pops and
    ``smallest`` give exactly what one heap would: the front is the heap's smallest part.
    """

    def __init__(self, versions: Versions[K] | None = None) -> None:
        self.versions: Versions[K] = versions if versions is not None else Versions()
        self._heap: list[Entry] = []
        #: sorted; every entry in it is smaller than every entry in ``_heap`` (class doc)
        self._front: list[Entry] = []

    def __len__(self) -> int:
        """Entries held, dead ones included."""
        return len(self._heap) + len(self._front)

    # push, pop, smallest and live run hundreds of thousands of times a run (the oracle's
    # estimates, the eviction index; live at every compaction): they test liveness inline
    # rather than through Versions.is_live, which costs a call each.

    def push(self, entry: Entry) -> None:
        front = self._front
        if front and entry < front[-1]:
            insort(front, entry)
        else:
            heappush(self._heap, entry)
        if len(self._heap) + len(front) > 2 * len(self.versions) + 1024:
            self.compact()

    def pop(self) -> Entry | None:
        """Remove and return the smallest live entry (``None`` when there is none)."""
        front, current = self._front, self.versions
        while front:
            entry = front.pop(0)
            if current.get(entry[-1]) == entry[-2]:
                return entry
        heap = self._heap
        while heap:
            entry = heappop(heap)
            if current.get(entry[-1]) == entry[-2]:
                return entry
        return None

    def restore(self, entries: list[Entry]) -> None:
        """Put back entries taken with :meth:`pop` that were not used."""
        front, heap = self._front, self._heap
        for entry in entries:
            if front and entry < front[-1]:
                insort(front, entry)
            else:
                heappush(heap, entry)

    def smallest(self, k: int, skip: Container[K] = ()) -> list[Entry]:
        """The ``k`` smallest live entries in order whose keys are not in ``skip``, left in the
        heap: O(f + (k + s) log n) the first time, ``f`` the front's entries read, ``s`` the
        skipped entries met on the way; O(f) while the front holds them (class doc).

        The dead entries read on the way are dropped for good. ``skip`` is for keys a caller
        ranks elsewhere (calls in flight): asking for ``k + len(skip)`` entries and filtering
        would read every skipped key's entry even where they all lie far down the heap.
        (Reading the heap's array best-first, without popping, was measured slower: 1.6 s
        against 1.0 s in a 15,000-call run of 150,000 users.)
        """
        front, current = self._front, self.versions
        taken: list[Entry] = []
        kept: list[Entry] = []  # the live entries of the front read so far
        read = 0
        for entry in front:
            if len(taken) >= k:
                break
            read += 1
            if current.get(entry[-1]) == entry[-2]:
                kept.append(entry)
                if not (skip and entry[-1] in skip):
                    taken.append(entry)
        if len(taken) < k:  # the whole front was read: the heap's smallest join it
            heap = self._heap
            while heap and len(taken) < k:
                entry = heappop(heap)
                if current.get(entry[-1]) == entry[-2]:
                    kept.append(entry)
                    if not (skip and entry[-1] in skip):
                        taken.append(entry)
        front[:read] = kept
        return taken

    def live(self) -> list[Entry]:
        """Every live entry, in no particular order."""
        current = self.versions
        return [e for part in (self._front, self._heap) for e in part
                if current.get(e[-1]) == e[-2]]

    def compact(self) -> None:
        current = self.versions
        self._front = [e for e in self._front if current.get(e[-1]) == e[-2]]
        self._heap = [e for e in self._heap if current.get(e[-1]) == e[-2]]
        heapify(self._heap)

    def reset(self, entries: list[Entry]) -> None:
        """Replace the contents by ``entries`` (which must be live)."""
        self._front = []
        self._heap = list(entries)
        heapify(self._heap)
