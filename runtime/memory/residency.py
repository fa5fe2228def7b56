"""The device tier: which memory objects are resident within the byte budget, and making room.

:class:`Residency` keeps the resident objects, the device bytes they use (plus those reserved by
transfers under way) and the :class:`~runtime.memory.eviction_index.EvictionIndex` of the
unpinned ones in the policy's order. :meth:`Residency.make_room` frees budget by evicting from
the index (and, for an urgent load, by aborting prefetches); :meth:`Residency.evict` takes one
object off the device and lets the :class:`~runtime.memory.tiers.Tiers` keep its contents.
Ranks by distance read the source's time-invariant ``order_key`` when it has one, so an entry
stays valid as time passes; without one the index is rebuilt before each eviction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from runtime.memory.copy_engine import Transfer
from runtime.memory.distance import DistanceSource, OrderedDistanceSource
from runtime.memory.eviction_index import EvictionIndex
from runtime.memory.lazy_heap import Entry
from runtime.memory.objects import AgentMemory
from runtime.memory.policies import Policy
from runtime.memory.tiers import Tiers
from runtime.memory.totals import MemoryTotals
from runtime.memory.transfers import Transfers

#: ``log(obj, op, tier_from, tier_to, cause, distance)``: the manager's row writer.
Log = Callable[[AgentMemory, str, str, str, str, float], None]


class Residency:
    """Resident objects under ``device_bytes`` (``inf``: no limit); see the module docstring."""

    def __init__(self, policy: Policy, device_bytes: float, tiers: Tiers, transfers: Transfers,
                 totals: MemoryTotals, log: Log,
                 with_host_copy: Callable[[], Iterable[AgentMemory]],
                 finish: Callable[[Transfer], None]) -> None:
        self.policy, self.device_bytes = policy, device_bytes
        self.tiers, self.transfers, self.totals = tiers, transfers, totals
        #: ``finish(transfer)`` installs or discards a done transfer (the manager's)
        self._log, self._with_host_copy, self._finish = log, with_host_copy, finish
        self.resident: dict[str, AgentMemory] = {}
        #: device bytes of resident objects plus those reserved by in-flight transfers
        self.used = 0
        self.index = EvictionIndex(self._rank, Tiers.copyable)
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

    # -- resident objects ---------------------------------------------------------------------

    def install(self, obj: AgentMemory) -> None:
        """``obj`` arrived on the device (its bytes were reserved when its load began)."""
        self.resident[obj.key] = obj
        self.policy.on_load(obj)
        if obj.pins == 0:
            self.index.add(obj)

    def pin(self, obj: AgentMemory) -> None:
        obj.pins += 1
        self.index.remove(obj.key)  # pinned: out of the eviction index

    def unpin(self, obj: AgentMemory) -> None:
        obj.pins -= 1
        if obj.pins == 0 and obj.device is not None:
            self.index.add(obj)

    def rerank(self, obj: AgentMemory) -> None:
        """``obj``'s distance changed: re-enter it if it is an eviction candidate."""
        if obj.device is not None and obj.pins == 0:
            self.index.add(obj)

    def rebuild_index(self) -> None:
        self.index.rebuild(o for o in self.resident.values() if o.pins == 0)

    # -- making room --------------------------------------------------------------------------

    def make_room(self, nbytes: int, *, protect: set[str], urgent: bool,
                  farther_than: float | None = None) -> bool:
        """Free ``nbytes`` of device budget by evicting (and, if urgent, aborting prefetches).

        Victims come off the eviction index in the policy's order. A prefetch (``farther_than``
        set) may only evict objects strictly farther than itself; under a distance policy the
        index pops in distance order, so the first nearer one ends the search. Nothing is
        evicted unless enough can be freed.
        """
        short = self.used + nbytes - self.device_bytes
        if short <= 0:
            return True
        if not self._indexed:
            self.rebuild_index()
        heap = self.index.main if farther_than is None else self.index.copies
        victims: list[Entry] = []
        aside: list[Entry] = []
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
                    continue
            victims.append(entry)
            freed += obj.nbytes
        prefetches: list[Transfer] = []
        if freed < short and urgent:
            for t in self.transfers.prefetches(protect):
                if freed >= short:
                    break
                prefetches.append(t)
                freed += t.obj.nbytes
        heap.restore(aside)
        if freed < short:
            heap.restore(victims)
            return False
        for entry in victims:
            self.evict(self.resident[entry[3]], cause="budget", protect=protect)
        for t in prefetches:
            self.transfers.abort(t)
            self._finish(t)
            if t.obj.device is not None:  # it finished before the abort reached it
                self.evict(t.obj, cause="budget", protect=protect)
        return True

    def reclaim(self, nbytes: int, kind: str | None = None) -> int:
        """Evict unpinned resident objects (of ``kind``) in the policy's order until ``nbytes``
        are freed or none is left; return the bytes freed."""
        if not self._indexed:
            self.rebuild_index()
        freed, aside = 0, []
        while freed < nbytes:
            entry = self.index.main.pop()
            if entry is None:
                break
            obj = self.resident[entry[3]]
            if kind is not None and obj.kind != kind:
                aside.append(entry)
                continue
            self.evict(obj, cause="pool")
            freed += obj.nbytes
        self.index.main.restore(aside)
        return freed

    def evict(self, obj: AgentMemory, cause: str, protect: Iterable[str] = frozenset()) -> None:
        """Take ``obj`` off the device, keeping a host or disk copy where one is worth keeping."""
        distance = self.distance_of(obj)
        # Read the contents before the engine frees them, unless a copy below already exists
        # (objects are immutable: a host or disk copy written earlier is still good).
        wanted = obj.host is None and (obj.disk_path is None or self.tiers.host_bytes > 0)
        tensors = obj.device_tensors() if wanted else {}
        obj.device = None
        obj.off_device()
        del self.resident[obj.key]
        self.index.remove(obj.key)
        self.used -= obj.nbytes
        self.totals.evictions += 1
        tier = self.tiers.keep(obj, tensors, **self.host_room(protect))
        self._log(obj, "drop" if tier == "none" else "evict", "device", tier, cause, distance)

    def host_room(self, protect: Iterable[str] = frozenset()) -> dict[str, Any]:
        """What the tiers need to make host room: the host copies not in ``protect`` that may
        go, the policy's rank of them, and the row writer."""
        protected = set(protect)
        return {"held": (o for o in self._with_host_copy() if o.key not in protected),
                "rank": lambda o: self.policy.eviction_rank(o, self.distance_of),
                "log": lambda o, op, frm, to, why: self._log(o, op, frm, to, why,
                                                             self.distance_of(o))}

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
        """Assert the budget and the index (the manager's :meth:`check` calls this)."""
        assert self.used <= self.device_bytes, (self.used, self.device_bytes)
        assert all(o.device is not None for o in self.resident.values())
        if not self._indexed:
            self.rebuild_index()
        self.index.check(self.resident)
