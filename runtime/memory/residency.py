"""The device tier: the one owner of the device budget, the resident set, the pins and the index.

:class:`Residency` is the only writer of four pieces of state: the device bytes in use (those of
the resident objects plus those *reserved* for loads under way), which objects are resident, the
pin count of every object, and the :class:`~runtime.memory.eviction_index.EvictionIndex` that
keeps the resident, unpinned objects in the policy's order.

It moves no data and reports nothing. When the budget is short it answers with an
:class:`EvictionPlan` — which objects leave the device and which prefetches are aborted for the
room — and the :class:`~runtime.memory.MemoryManager` carries the plan out: it asks the
:class:`~runtime.memory.tiers.Tiers` where each object's contents go, aborts the transfers and
reports every step, telling the residency as each object leaves (:meth:`Residency.remove`) or
arrives (:meth:`Residency.install`). Nothing here calls back into the manager.

Eviction is leaf-first: an object with a resident dependent (a prefix segment whose
continuation is on the device) is no candidate, like a pinned one, until the dependent leaves.

Ranks by distance read the source's time-invariant ``order_key`` when it has one, so an entry
stays valid as time passes; without one the index is rebuilt before each eviction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from runtime.memory.copy_engine import Transfer
from runtime.memory.distance import DistanceSource, OrderedDistanceSource
from runtime.memory.eviction_index import EvictionIndex
from runtime.memory.lazy_heap import Entry
from runtime.memory.objects import AgentMemory
from runtime.memory.policies import Policy
from runtime.memory.tiers import Tiers


@dataclass
class EvictionPlan:
    """What must leave the device to make room, in the order the manager carries it out."""

    #: resident, unpinned objects to take off the device, in the policy's order
    victims: list[AgentMemory] = field(default_factory=list)
    #: prefetches under way to abort (farthest first); their reserved bytes come back
    aborts: list[Transfer] = field(default_factory=list)


class Residency:
    """Resident objects under ``device_bytes`` (``inf``: no limit); see the module docstring."""

    def __init__(self, policy: Policy, device_bytes: float) -> None:
        self.policy, self.device_bytes = policy, device_bytes
        self.resident: dict[str, AgentMemory] = {}
        #: the bytes held for each load under way, by object key
        self.reserved: dict[str, int] = {}
        #: device bytes of resident objects plus those reserved for loads under way
        self.used = 0
        self.index = EvictionIndex(self._rank, Tiers.copyable,
                                   lambda key: self.resident[key].kind)
        #: resident objects with resident dependents: how many (leaf-first eviction)
        self.held_up: dict[str, int] = {}
        self.distance: DistanceSource | None = None
        self._order_key: Callable[[str], float] | None = None
        self._indexed = True

    def use_distance(self, source: DistanceSource | None) -> None:
        self.distance = source
        self._order_key = None
        if isinstance(source, OrderedDistanceSource):
            self._order_key = source.order_key
        # Without notifications a distance rank can go stale unseen: rebuild before evicting.
        self._indexed = not self.policy.uses_distance or source is None or \
            self._order_key is not None
        self.rebuild_index()

    def distance_of(self, obj: AgentMemory) -> float:
        """The object's invocation distance: the nearest of its users (``inf`` without a source)."""
        source = self.distance
        if source is None or not obj.users:
            return math.inf
        if len(obj.users) == 1:
            for user in obj.users:
                return source.distance(user)
        return min(source.distance(u) for u in obj.users)

    def learn(self, obj: AgentMemory) -> None:
        """A newly registered object: give it its tie-breaking place in the index."""
        self.index.learn(obj)

    # -- the budget and the resident set ------------------------------------------------------

    def reserve(self, obj: AgentMemory) -> None:
        """A load of ``obj`` begins: hold its bytes now, so the budget holds while it copies."""
        self.reserved[obj.key] = obj.nbytes
        self.used += obj.nbytes

    def unreserve(self, obj: AgentMemory) -> None:
        """``obj``'s load was aborted or failed: give its bytes back."""
        self.used -= self.reserved.pop(obj.key)

    def install(self, obj: AgentMemory) -> None:
        """``obj`` arrived on the device: its reserved bytes now count as resident."""
        del self.reserved[obj.key]
        self._enter(obj)
        self.policy.on_load(obj)
        if self.evictable(obj):
            self.index.add(obj)

    def remove(self, obj: AgentMemory) -> None:
        """``obj`` left the device (the manager evicted it)."""
        self._leave(obj)
        self.used -= obj.nbytes

    def replace(self, old: AgentMemory, parts: list[AgentMemory]) -> None:
        """``parts`` take the place of ``old`` (a prefix segment split in two): the same bytes,
        residency and pins."""
        for part in parts:
            self.index.learn(part)
        if old.device is None:
            return
        self._leave(old)
        for part in parts:
            self._enter(part)
        for part in parts:
            if self.evictable(part):
                self.index.add(part)

    def _enter(self, obj: AgentMemory) -> None:
        self.resident[obj.key] = obj
        held = sum(1 for d in obj.dependents() if d.key in self.resident)
        if held:
            self.held_up[obj.key] = held
        parent = obj.parent
        if parent is not None and parent.key in self.resident:
            self.held_up[parent.key] = self.held_up.get(parent.key, 0) + 1
            self.index.remove(parent.key)

    def _leave(self, obj: AgentMemory) -> None:
        del self.resident[obj.key]
        self.index.remove(obj.key)
        self.held_up.pop(obj.key, None)
        parent = obj.parent
        if parent is not None and parent.key in self.resident:
            left = self.held_up[parent.key] - 1
            if left:
                self.held_up[parent.key] = left
            else:
                del self.held_up[parent.key]
                if parent.pins == 0:
                    self.index.add(parent)

    def evictable(self, obj: AgentMemory) -> bool:
        """Whether resident ``obj`` is an eviction candidate: unpinned, no resident dependent."""
        return obj.pins == 0 and obj.key not in self.held_up

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, obj: AgentMemory) -> None:
        """A request holds ``obj`` (resident, or about to be loaded for it)."""
        obj.pins += 1
        self.index.remove(obj.key)  # pinned: out of the eviction index

    def unpin(self, obj: AgentMemory) -> None:
        obj.pins -= 1
        if obj.device is not None and self.evictable(obj):
            self.index.add(obj)

    def release(self, obj: AgentMemory) -> bool:
        """A finished request lets go of ``obj``; ``True`` when it must now leave the device
        (the ``none`` policy keeps nothing between calls), which the caller does."""
        if obj.pins == 1 and not self.policy.keep_between_calls and obj.device is not None:
            obj.pins = 0  # not indexed: it is evicted at once
            return True
        self.unpin(obj)
        return False

    # -- the index ----------------------------------------------------------------------------

    def rerank(self, obj: AgentMemory) -> None:
        """``obj``'s distance changed: re-enter it if it is an eviction candidate."""
        if obj.device is not None and self.evictable(obj):
            self.index.add(obj)

    def rerank_all(self, objs: Iterable[AgentMemory]) -> None:
        """:meth:`rerank` each of ``objs`` (most are not resident: tested here, no call each)."""
        add, held_up = self.index.add, self.held_up
        for obj in objs:
            if obj.device is not None and obj.pins == 0 and obj.key not in held_up:
                add(obj)

    def rebuild_index(self) -> None:
        self.index.rebuild(o for o in self.resident.values() if self.evictable(o))

    # -- plans --------------------------------------------------------------------------------

    def plan_room(self, nbytes: int, *, protect: set[str], abortable: Iterable[Transfer] = (),
                  farther_than: float | None = None) -> EvictionPlan | None:
        """How to free ``nbytes`` of device budget: evictions, then aborts of ``abortable``
        prefetches (an urgent load passes them); ``None`` if not enough can be freed.

        Victims come off the eviction index in the policy's order, never one in ``protect``. A
        prefetch (``farther_than`` set) may only evict objects strictly farther than itself;
        under a distance policy the index pops in distance order, so the first nearer one ends
        the search. The plan must be carried out before the index is used again: its victims
        are off the index until they leave the device.
        """
        short = self.used + nbytes - self.device_bytes
        if short <= 0:
            return EvictionPlan()
        if not self._indexed:
            self.rebuild_index()
        heap = self.index.main if farther_than is None else self.index.copies
        victims: list[Entry] = []
        aside: list[Entry] = []
        opened: dict[str, int] = {}
        freed = 0
        while freed < short:
            entry = heap.pop()
            if entry is None:
                break
            key = entry[3]
            obj = self.resident[key]
            if key in protect:
                aside.append(entry)
                continue
            if farther_than is not None:
                if not self.distance_of(obj) > farther_than:
                    aside.append(entry)
                    if self.policy.uses_distance:
                        break  # every object left in the index is at least as near
                    continue
                if not Tiers.copyable(obj):
                    # Its host copy went since it was indexed. A prefetch saves one copy's
                    # latency; evicting what only a recompute can rebuild (a dropped prefix KV)
                    # costs a whole prefill if the prediction is wrong: only a demand load may.
                    self.index.left_copy_heap(key)
                    continue
            victims.append(entry)
            freed += obj.nbytes
            self._open_parent(obj, opened)
        aborts: list[Transfer] = []
        if freed < short:
            for t in abortable:
                if freed >= short:
                    break
                aborts.append(t)
                freed += t.obj.nbytes
        heap.restore(aside)
        if freed < short:
            self._close_parents(opened)
            heap.restore(victims)
            return None
        return EvictionPlan([self.resident[entry[3]] for entry in victims], aborts)

    def plan_reclaim(self, nbytes: int, kind: str | None = None) -> EvictionPlan:
        """Unpinned resident objects (of ``kind``) in the policy's order, until ``nbytes`` or
        none is left (the plan may free less)."""
        if not self._indexed:
            self.rebuild_index()
        plan, freed = EvictionPlan(), 0
        heap = self.index.main if kind is None else self.index.of_kind(kind)
        opened: dict[str, int] = {}
        while freed < nbytes:
            entry = heap.pop()
            if entry is None:
                break
            obj = self.resident[entry[3]]
            plan.victims.append(obj)
            freed += obj.nbytes
            self._open_parent(obj, opened)
        return plan

    def _open_parent(self, victim: AgentMemory, opened: dict[str, int]) -> None:
        """A plan takes ``victim``: its parent, once no resident dependent is left to it, is a
        candidate of the same plan (leaf-first, a whole branch can go at once). ``opened``
        counts the dependents planned away per parent."""
        parent = victim.parent
        if parent is None or parent.key not in self.held_up:
            return
        opened[parent.key] = opened.get(parent.key, 0) + 1
        if opened[parent.key] == self.held_up[parent.key] and parent.pins == 0:
            self.index.add(parent)

    def _close_parents(self, opened: dict[str, int]) -> None:
        """A plan that failed: the parents it opened are no candidates after all."""
        for key, n in opened.items():
            if n == self.held_up.get(key):
                self.index.remove(key)

    # -- ranks --------------------------------------------------------------------------------

    def _rank(self, obj: AgentMemory) -> Any:
        return self.policy.eviction_rank(obj, self._index_distance)

    def _index_distance(self, obj: AgentMemory) -> float:
        """The distance the index ranks by: the source's time-invariant order key if it has one."""
        order_key = self._order_key
        if order_key is None:
            return self.distance_of(obj)
        users = obj.users
        if len(users) == 1:
            for user in users:
                return order_key(user)
        return min((order_key(u) for u in users), default=math.inf)

    def check(self) -> None:
        """Assert the budget, the reservations and the index (the manager's :meth:`check`)."""
        assert self.used == sum(o.nbytes for o in self.resident.values()) + \
            sum(self.reserved.values()), (self.used, "resident and reserved bytes disagree")
        assert self.used <= self.device_bytes, (self.used, self.device_bytes)
        assert not self.reserved.keys() & self.resident.keys(), "reserved a resident object"
        assert all(o.device is not None for o in self.resident.values())
        assert all(o.pins >= 0 for o in self.resident.values())
        if not self._indexed:
            self.rebuild_index()
        for key, held in self.held_up.items():
            obj = self.resident[key]
            assert held == sum(1 for d in obj.dependents() if d.key in self.resident), key
        self.index.check(self.resident, self.evictable)
