"""The eviction index: resident, unpinned memory objects in the order a policy evicts them.

Two :class:`~runtime.memory.lazy_heap.LazyHeap` share one version table: the main heap holds
every resident unpinned object, the *copy* heap the same entries for the objects a copy can
bring back (a host or disk copy, or their own file). A prefetch may only evict the latter, and
scanning past every dropped prefix KV in the main heap made each prefetch O(n). For the same
reason a *kind* of object that is asked for by kind gets a heap of its own, from the first
time it is asked for on: the engine reclaims cached prefix segments when its KV pool runs
short, and scanning past 150,000 adapters for each of them made every reclaim O(n log n) (97%
of a 150,000-user run's time). Kinds never asked for (adapters) cost no third push. Entries are
``(rank, serial, version, key)``: the policy's rank, then registration order as tie-breaker.

Re-entering an object whose live entry already has its rank (and is in the copy heap exactly
when the object is copyable) pushes nothing: the serial, not the version, breaks ties, so the
old entry pops exactly where a new one would. An agent is re-estimated about thirteen times
per call and the manager re-ranks all its resident objects after each batch of them; a
quarter of those re-ranks found the rank unchanged and pushed three entries for nothing.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

from runtime.memory.lazy_heap import Entry, LazyHeap, Versions
from runtime.memory.objects import AgentMemory


class EvictionIndex:
    """Resident evictable objects by ``rank(obj)``; ``copyable(obj)`` selects the copy heap."""

    def __init__(self, rank: Callable[[AgentMemory], Any],
                 copyable: Callable[[AgentMemory], bool],
                 kind_of: Callable[[str], str]) -> None:
        self._rank, self._copyable, self._kind_of = rank, copyable, kind_of
        self._versions: Versions[str] = Versions()
        self.main: LazyHeap[str] = LazyHeap(self._versions)
        self.copies: LazyHeap[str] = LazyHeap(self._versions)
        self._kinds: dict[str, LazyHeap[str]] = {}
        self._serial: dict[str, int] = {}
        self._serials = itertools.count()
        #: key -> (rank, in the copy heap) of its live entry, when it was last entered; read
        #: only while the key is live (``key in self._versions``)
        self._entered: dict[str, tuple[Any, bool]] = {}

    def learn(self, obj: AgentMemory) -> None:
        """Give a newly registered object its tie-breaking serial."""
        if obj.key not in self._serial:
            self._serial[obj.key] = next(self._serials)

    def forget(self, key: str) -> None:
        """``key`` is gone for good (it is no candidate now either)."""
        self._versions.drop(key)
        self._serial.pop(key, None)
        self._entered.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._versions

    def add(self, obj: AgentMemory) -> None:
        """(Re-)enter ``obj`` under its current rank (nothing to do if its live entry has it)."""
        key = obj.key
        placed = (self._rank(obj), self._copyable(obj))
        if key in self._versions and self._entered.get(key) == placed:
            return  # its live entry pops where a new one would (module doc)
        self._entered[key] = placed
        entry = (placed[0], self._serial[key], self._versions.stamp(key), key)
        self.main.push(entry)
        by_kind = self._kinds.get(obj.kind)
        if by_kind is not None:
            by_kind.push(entry)
        if placed[1]:
            self.copies.push(entry)

    def left_copy_heap(self, key: str) -> None:
        """``key``'s live entry was taken off the copy heap for good (the object is no longer
        copyable): its next :meth:`add` must push again."""
        self._entered.pop(key, None)

    def of_kind(self, kind: str) -> LazyHeap[str]:
        """The heap of the candidates of one kind (``adapter``, ``prefix_kv``...), made from the
        main heap the first time (``kind_of`` names the kind of a candidate's key)."""
        heap = self._kinds.get(kind)
        if heap is None:
            heap = self._kinds[kind] = LazyHeap(self._versions)
            heap.reset([e for e in self.main.live() if self._kind_of(e[3]) == kind])
        return heap

    def remove(self, key: str) -> None:
        """``key`` was pinned or left the device: it is no eviction candidate now."""
        self._versions.drop(key)
        self._entered.pop(key, None)

    def is_live(self, entry: Entry) -> bool:
        return self._versions.is_live(entry)

    def rebuild(self, unpinned: Iterable[AgentMemory]) -> None:
        """Rank every one of ``unpinned`` afresh (a distance source that cannot be watched)."""
        self._versions.clear()
        self._entered.clear()
        main: list[Entry] = []
        copies: list[Entry] = []
        kinds: dict[str, list[Entry]] = {kind: [] for kind in self._kinds}
        for obj in unpinned:
            placed = self._entered[obj.key] = (self._rank(obj), self._copyable(obj))
            entry = (placed[0], self._serial[obj.key], self._versions.stamp(obj.key), obj.key)
            main.append(entry)
            if obj.kind in kinds:
                kinds[obj.kind].append(entry)
            if placed[1]:
                copies.append(entry)
        self.main.reset(main)
        self.copies.reset(copies)
        for kind, entries in kinds.items():
            self._kinds[kind].reset(entries)

    def check(self, resident: dict[str, AgentMemory],
              evictable: Callable[[AgentMemory], bool]) -> None:
        """Assert that the index holds exactly the ``evictable`` resident objects at their rank."""
        live = {e[3]: e for e in self.main.live()}
        assert set(live) == set(self._versions), "index versions without a live entry"
        unpinned = {k for k, o in resident.items() if evictable(o)}
        assert set(live) == unpinned, (sorted(live), sorted(unpinned))
        for key, entry in live.items():
            assert entry[0] == self._rank(resident[key]), (key, entry[0])
        copy_live = {e[3] for e in self.copies.live()}
        assert copy_live <= set(live), "copy index holds an object the main index does not"
        assert {k for k in live if self._copyable(resident[k])} <= copy_live, \
            "a copyable resident object is missing from the copy index"
        for kind, heap in self._kinds.items():
            assert {e[3] for e in heap.live()} == {k for k in live if resident[k].kind == kind}, \
                f"the {kind} heap does not hold exactly the {kind} candidates"
