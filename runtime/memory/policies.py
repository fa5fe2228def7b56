"""Replacement policies: which resident object leaves the device first, and whether to prefetch.

A policy ranks eviction candidates with :meth:`Policy.eviction_rank` (the smallest rank leaves
first; the manager keeps resident objects in a heap by it) and says whether the manager prefetches ahead of need. The distance-driven policies
(``scalesim``, ``belady``) rank by invocation distance; the classic ones by access history:

========== ================================================================================
scalesim   evict the largest invocation distance; prefetch the smallest (DistanceOracle)
belady     the same, with exact distances from an earlier run's recorded call sequence
lru        least recently used leaves first; load on demand (the SGLang / vLLM default)
lfu        least frequently used leaves first (ties: least recent); load on demand
fifo       first loaded leaves first; load on demand
infinite   every object resident from the start: no limit, no cold miss (the bound)
unlimited  no device limit, objects load on their first use (cold misses, never evicted)
none       nothing is kept between calls: every call loads its objects again
========== ================================================================================
"""

from __future__ import annotations

from typing import Any, Callable

from runtime.memory.objects import AgentMemory


class Policy:
    """Base policy: the hooks the manager calls.

    ``distance`` in :meth:`eviction_rank` gives an object's distance rank: its invocation
    distance, or a time-invariant key that orders objects the same way (``order_key``).
    """

    name = "base"
    prefetch = False
    keep_between_calls = True
    unlimited = False
    #: objects are on the device from the start: registering one installs it at no cost
    resident_from_start = False
    uses_distance = False

    def __init__(self) -> None:
        self.clock = 0
        self.last_access: dict[str, int] = {}
        self.loaded_at: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def on_access(self, obj: AgentMemory) -> None:
        self.clock += 1
        self.last_access[obj.key] = self.clock
        self.count[obj.key] = self.count.get(obj.key, 0) + 1

    def on_load(self, obj: AgentMemory) -> None:
        self.clock += 1
        self.loaded_at[obj.key] = self.clock

    def inherit(self, old: AgentMemory, new: AgentMemory) -> None:
        """``new`` takes ``old``'s place (a split segment): it has ``old``'s history."""
        for table in (self.last_access, self.loaded_at, self.count):
            if old.key in table:
                table[new.key] = table[old.key]

    def forget(self, key: str) -> None:
        """The object ``key`` is gone for good: drop its history."""
        for table in (self.last_access, self.loaded_at, self.count):
            table.pop(key, None)

    def eviction_rank(self, obj: AgentMemory, distance: Callable[[AgentMemory], float]) -> Any:
        """A sortable rank: the object with the smallest rank is evicted first.

        A rank may only change through :meth:`on_access`, :meth:`on_load` or a distance change;
        the manager re-ranks an object exactly then.
        """
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def eviction_rank(self, obj, distance):
        return self.last_access.get(obj.key, 0)


class LFU(Policy):
    name = "lfu"

    def eviction_rank(self, obj, distance):
        return (self.count.get(obj.key, 0), self.last_access.get(obj.key, 0))


class FIFO(Policy):
    name = "fifo"

    def eviction_rank(self, obj, distance):
        return self.loaded_at.get(obj.key, 0)


class DistancePolicy(Policy):
    """Evict the farthest object first, prefetch the nearest (ties: least recently used)."""

    name = "scalesim"
    prefetch = True
    uses_distance = True

    def eviction_rank(self, obj, distance):
        return (-distance(obj), self.last_access.get(obj.key, 0))


class Belady(DistancePolicy):
    name = "belady"


class Unlimited(LRU):
    name = "unlimited"
    unlimited = True


class Infinite(Unlimited):
    """The bound every policy is measured against: nothing is ever missing from the device.

    Where an object cannot be had for free (:meth:`AgentMemory.preload` returns ``None``: the
    real engine's prefix KV, which only a prefill computes) it loads on first use as under
    ``unlimited``.
    """

    name = "infinite"
    resident_from_start = True


class NoCache(LRU):
    name = "none"
    keep_between_calls = False


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (DistancePolicy, Belady, LRU, LFU, FIFO, Infinite, Unlimited,
                               NoCache)
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown memory policy {name!r}; choose one of "
                         f"{', '.join(POLICIES)}") from None
