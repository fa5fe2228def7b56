"""The memory manager: which agent memory objects are on the device, and moving them there.

The engine's admission (:mod:`runtime.admission`) calls it at three points of every request::

    stats = memory.acquire(request_id, objects)   # admitted: pin, load what is missing (may wait)
    ... forward passes ...
    memory.release(request_id)                     # finished: unpin
    memory.tick()                                  # between iterations: install copies, prefetch

:meth:`MemoryManager.acquire` makes a request's objects resident and pins them; objects already on
the device are *hits*, the others *misses* that are loaded urgently (preempting prefetches) while
the request waits — that wait is its *stall*. If the device budget is full of objects pinned by
other running requests it returns ``None`` and the request waits for a later iteration; if the
request's own objects can never fit, it raises :class:`WorkingSetTooLarge`.

Each piece of state has one owner, and the manager is the one that acts on them. The
:class:`~runtime.memory.residency.Residency` owns the device budget, the resident set, the pins
and the :class:`~runtime.memory.eviction_index.EvictionIndex` of unpinned objects in the policy's
order (O(log n) per eviction); when room is short it returns an
:class:`~runtime.memory.residency.EvictionPlan`, which the manager carries out. Ranks change on
access, load, pin and release, which the residency sees, and with distances, which the manager
learns from an :class:`~runtime.memory.distance.OrderedDistanceSource` it watches; for a source
that cannot be watched the index is rebuilt before each eviction. The
:class:`~runtime.memory.tiers.Tiers` own the host budget and the disk copies: an evicted object
keeps a host copy when the host budget allows, else a disk copy, else it is dropped and later
rebuilt from its origin. The :class:`~runtime.memory.transfers.Transfers` own the loads under
way, which run on a :class:`~runtime.memory.copy_engine.CopyLink`, whose clock also measures
stalls. The manager owns the registry of objects, who holds them, and the
:class:`~runtime.memory.totals.MemoryTotals`.

With a distance-driven policy, :meth:`MemoryManager.tick` prefetches the objects of the agents
nearest to calling and never evicts an object nearer than the one it brings in, nor one that
only a recompute could bring back (a dropped prefix KV): a prefetch hides one copy, a wrong
guess there would cost a whole prefill.

Every load, prefetch, abort, eviction, drop and recompute is reported to :attr:`listeners` as one
:class:`~runtime.memory.events.MemoryEvent` (a row of the run's ``memory.parquet`` but for
``sim_time``, which the front end adds).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch

from runtime.memory.copy_engine import CopyEngine, CopyLink, Transfer
from runtime.memory.distance import DistanceSource, OrderedDistanceSource
from runtime.memory.events import MemoryEvent
from runtime.memory.kv_store import KVStore
from runtime.memory.object_file import CorruptObjectFile, read_object
from runtime.memory.objects import AgentMemory, Tensors
from runtime.memory.policies import Policy, make_policy
from runtime.memory.residency import EvictionPlan, Residency
from runtime.memory.tiers import Moved, Tiers
from runtime.memory.totals import MemoryTotals
from runtime.memory.transfers import Transfers
from runtime.request import MemoryStats, RequestError


class WorkingSetTooLarge(RequestError):
    """One request needs more device memory than the whole device budget."""


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _disk_copy_failed(transfer: Transfer) -> bool:
    """Whether ``transfer`` failed reading a disk-tier copy (a damaged or vanished file), which
    the object's origin can replace; an object re-read from its own file has no other source."""
    return transfer.source == "disk" and transfer.obj.origin == "recompute" and \
        isinstance(transfer.error, (CorruptObjectFile, OSError))


class MemoryManager:
    """Device, host and disk tiers under one policy; see the module docstring.

    ``device_bytes=None`` (or the ``infinite`` policy) means no device limit and
    ``host_bytes=None`` no host limit; ``host_bytes=0`` disables the host tier. ``disk_dir``
    enables the disk tier, ``kv_store`` the persistent store (capped at ``kv_store_bytes``),
    which is also the disk tier of objects with an identity. ``virtual_disk`` (the modeled
    executor) records disk copies without writing any. ``lookahead`` is how many nearest agents a prefetch pass considers
    besides those whose requests already hold their objects. ``copy`` is the copy engine (by
    default a :class:`CopyEngine` thread on ``device`` with the optional emulated link).
    """

    def __init__(
        self,
        policy: str | Policy = "lru",
        *,
        device_bytes: int | None = None,
        host_bytes: int | None = None,
        disk_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        link_gbps: float | None = None,
        link_latency_us: float = 0.0,
        lookahead: int = 16,
        distance: DistanceSource | None = None,
        chunk_bytes: int | None = None,
        copy: CopyLink | None = None,
        kv_store: str | Path | KVStore | None = None,
        kv_store_bytes: int | None = None,
        virtual_disk: bool = False,
    ) -> None:
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.device = torch.device(device)
        unlimited = self.policy.unlimited or device_bytes is None
        self.device_bytes: float = math.inf if unlimited else int(device_bytes or 0)
        if not self.policy.keep_between_calls:
            host_bytes, disk_dir, kv_store = 0, None, None  # `none` keeps nothing anywhere
        if virtual_disk:  # a modeled run: the disk tier is a cost, no directory is touched
            if disk_dir is None and kv_store is not None:
                disk_dir = "<modeled disk>"
            kv_store = None
        store = KVStore(kv_store, kv_store_bytes) if isinstance(kv_store, (str, Path)) \
            else kv_store
        self.tiers = Tiers(host_bytes, disk_dir, pin=self.device.type == "cuda", store=store,
                           virtual_disk=virtual_disk)
        self.lookahead = lookahead
        self.copy: CopyLink = copy if copy is not None else CopyEngine(
            self.device, link_gbps=link_gbps, link_latency_us=link_latency_us,
            chunk_bytes=chunk_bytes)
        #: called with every :class:`MemoryEvent` as it happens
        self.listeners: list[Callable[[MemoryEvent], None]] = []
        self.totals = MemoryTotals()
        self._objects: dict[str, AgentMemory] = {}
        self._by_agent: dict[str, list[str]] = defaultdict(list)
        #: agents re-estimated since the eviction index was last read (an ordered set)
        self._stale: dict[str, None] = {}
        self._owners: dict[Hashable, list[AgentMemory]] = {}
        self._transfers = Transfers(self.copy, self.tiers)
        self._device = Residency(self.policy, self.device_bytes)
        self.use_distance(distance)

    # -- what others may read -----------------------------------------------------------------

    @property
    def distance(self) -> DistanceSource | None:
        """Where invocation distances come from (see :meth:`use_distance`)."""
        return self._device.distance

    @property
    def device_used(self) -> int:
        """Device bytes of resident objects plus those reserved by transfers under way."""
        return self._device.used

    @property
    def host_used(self) -> int:
        return self.tiers.host_used

    @property
    def host_bytes(self) -> float:
        return self.tiers.host_bytes

    @property
    def objects(self) -> Mapping[str, AgentMemory]:
        """Every registered object by key (read-only)."""
        return MappingProxyType(self._objects)

    @property
    def resident(self) -> Mapping[str, AgentMemory]:
        """The objects on the device by key (read-only)."""
        return MappingProxyType(self._device.resident)

    @property
    def inflight(self) -> dict[str, Transfer]:
        """The transfers under way by object key (a copy)."""
        return {t.obj.key: t for t in self._transfers}

    def held_by(self, owner: Hashable) -> list[AgentMemory]:
        """The objects the admitted request ``owner`` holds pinned."""
        return list(self._owners.get(owner, ()))

    def keys_of(self, agent: str) -> list[str]:
        """The keys of ``agent``'s objects, in registration order."""
        return list(self._by_agent.get(agent, ()))

    def use_distance(self, source: DistanceSource | None) -> None:
        """Read invocation distances from ``source``; a watchable one keeps the index current."""
        self._device.use_distance(source)
        if isinstance(source, OrderedDistanceSource):
            source.watch(self._distance_changed)

    # -- objects ------------------------------------------------------------------------------

    def register(self, obj: AgentMemory, users: Iterable[str] = (), *,
                 preload: bool = True) -> AgentMemory:
        """Make ``obj`` known (once per key: a shared object is stored once) and add its users
        (``preload=False``: not installed from the start even under ``infinite``)."""
        known = self._objects.get(obj.key)
        if known is None:
            known = self._objects[obj.key] = obj
            self._device.learn(obj)
            self._report(self.tiers.adopt(obj, **self._host_room()))
            if self.policy.resident_from_start and preload:
                self._preload(obj)
        for user in users:
            if user not in known.users:
                known.users.add(user)
                self._by_agent[user].append(known.key)
                if self.policy.uses_distance:  # its rank is the nearest user's: maybe nearer now
                    self._stale[user] = None
        return known

    def distance_of(self, obj: AgentMemory) -> float:
        """The object's invocation distance: the nearest of its users (``inf`` without a source)."""
        return self._device.distance_of(obj)

    def forget(self, obj: AgentMemory) -> None:
        """Remove an unused object for good (its content changed: a new prefix, a new adapter)."""
        if obj.pins or obj.key in self._transfers:
            raise RuntimeError(f"memory object {obj.key!r} is in use; it cannot be forgotten")
        if obj.device is not None:
            self._evict(obj, cause="replaced")
        self.tiers.forget(obj)
        for user in obj.users:
            if obj.key in self._by_agent.get(user, ()):
                self._by_agent[user].remove(obj.key)
        if self._objects.get(obj.key) is obj:
            del self._objects[obj.key]
            self.policy.forget(obj.key)
            self._device.index.forget(obj.key)

    def install_computed(self, obj: AgentMemory, users: Iterable[str] = (), *,
                         protect: Iterable[str] = (), log: str | None = None) -> bool:
        """Make ``obj``, whose contents the engine has just computed in place (a prefix segment
        of a request's KV), resident: register it, make room in the policy's order (never
        evicting ``protect``) and install it at no copy cost. ``False`` if no room can be made
        (nothing changes; the caller lets the contents go). Reported (op ``compute``) only
        with a ``log`` cause: a prefix cache inserts on most calls."""
        obj = self.register(obj, users, preload=False)
        if obj.device is not None:
            return True
        if obj.key in self._transfers or obj.nbytes > self.device_bytes:
            return False
        self._rerank_stale()
        plan = self._device.plan_room(obj.nbytes, protect={obj.key, *protect})
        if plan is None:
            return False
        self._carry_out(plan, {obj.key})
        self._device.reserve(obj)
        obj.device = {}
        self.policy.on_access(obj)
        self._device.install(obj)
        self.totals.bytes_cached += obj.nbytes
        if log is not None:
            self._log(obj, "compute", "compute", "device", log, self.distance_of(obj))
        return True

    def replace(self, old: AgentMemory, parts: list[AgentMemory]) -> bool:
        """Put ``parts`` in the place of ``old`` (a prefix segment split where two requests'
        tokens part): the same users, pins, holders and residency; copies of ``old`` below the
        device are let go (they hold the whole). The caller has already linked the parts
        (``parent``, ``dependents``) and split the contents, and their bytes add up to
        ``old``'s. ``False`` while ``old`` is being loaded (nothing changes)."""
        if old.key in self._transfers:
            return False
        if self._objects.get(old.key) is not old:
            raise RuntimeError(f"memory object {old.key!r} is not registered here")
        if sum(p.nbytes for p in parts) != old.nbytes:
            raise ValueError(f"the parts of {old.key!r} do not add up to its {old.nbytes} bytes")
        self.tiers.forget(old)
        for part in parts:
            part.users = set(old.users)
            part.pins = old.pins
            part.device = None if old.device is None else {}
            self._objects[part.key] = part
            self.policy.inherit(old, part)
        self._device.replace(old, parts)
        del self._objects[old.key]
        self.policy.forget(old.key)
        keys = [p.key for p in parts]
        for user in old.users:
            held = self._by_agent[user]
            at = held.index(old.key)
            held[at:at + 1] = keys
        for owner, objs in self._owners.items():
            if old in objs:
                at = objs.index(old)
                objs[at:at + 1] = parts
        return True

    # -- the three calls of a request ---------------------------------------------------------

    def acquire(self, owner: Hashable, objects: Sequence[AgentMemory]) -> MemoryStats | None:
        """Pin ``objects`` for ``owner`` on the device, loading the missing ones (waits).

        Returns the request's :class:`MemoryStats`, or ``None`` if the device is too full of
        other requests' pinned objects right now (nothing is pinned then; retry later).
        """
        if owner in self._owners:
            raise RuntimeError(f"memory owner {owner!r} already holds its objects")
        objs = list({o.key: self.register(o) for o in objects}.values())
        needed = sum(o.nbytes for o in objs)
        if needed > self.device_bytes:
            parts = ", ".join(f"{o.kind} {o.key} {_mib(o.nbytes)}" for o in objs)
            raise WorkingSetTooLarge(
                f"request {owner}: its memory objects need {_mib(needed)} ({parts}) but the device "
                f"budget (runtime.memory.device_bytes) is {_mib(self.device_bytes)}")
        self.poll()
        keys = {o.key for o in objs}
        hits = [o for o in objs if o.device is not None]
        misses = [o for o in objs if o.device is None]
        for o in hits:
            self._device.pin(o)
        # Make room for every miss before loading any, so a failure leaves nothing half-loaded.
        need = sum(o.nbytes for o in misses if o.key not in self._transfers)
        if need:  # an urgent load may abort prefetches for its room
            self._rerank_stale()
            plan = self._device.plan_room(need, protect=keys,
                                          abortable=self._transfers.prefetches(keys))
            if plan is None:
                for o in hits:
                    self._device.unpin(o)
                return None
            self._carry_out(plan, keys)
        for o in misses:
            self._device.pin(o)
        start = self.copy.now()
        try:
            pending = [self._urgent_load(o) for o in misses]
            for o, transfer in zip(misses, pending):
                if transfer is not None:
                    self._wait(o, transfer)
        except BaseException:
            for o in objs:
                self._device.unpin(o)
            raise
        stats = MemoryStats()
        stats.stall_s = self.copy.now() - start if misses else 0.0
        for o in objs:
            self.policy.on_access(o)
            bucket = stats.misses if o in misses else stats.hits
            bucket[o.kind] = bucket.get(o.kind, 0) + 1
        stats.bytes_loaded = sum(o.nbytes for o in misses)
        self._owners[owner] = objs
        self.totals.hits += len(hits)
        self.totals.misses += len(misses)
        self.totals.stall_s += stats.stall_s
        return stats

    def release(self, owner: Hashable) -> None:
        """Unpin ``owner``'s objects (the ``none`` policy drops them from the device here)."""
        for o in self._owners.pop(owner, ()):
            if self._device.release(o):
                self._evict(o, cause="policy none")

    def tick(self) -> None:
        """Between iterations: install finished transfers, then prefetch by distance."""
        self.poll()
        source = self._device.distance
        if self.policy.prefetch and source is not None:
            self._prefetch(source)

    def reclaim(self, nbytes: int, kind: str | None = None) -> int:
        """Evict unpinned resident objects (of ``kind``) in the policy's order until ``nbytes``
        are freed or none is left; return the bytes freed.

        The engine calls this when a pool the objects live in (the KV pool) runs short for
        running sequences, so the budget is not the only reason to let an object go.
        """
        self._rerank_stale()
        plan = self._device.plan_reclaim(nbytes, kind)
        for obj in plan.victims:
            self._evict(obj, cause="pool")
        return sum(obj.nbytes for obj in plan.victims)

    def tensors(self, obj: AgentMemory) -> Tensors:
        """The device tensors of a pinned object."""
        if obj.device is None:
            raise RuntimeError(f"memory object {obj.key!r} is not on the device (acquire it)")
        return obj.device

    def poll(self) -> None:
        """Install every transfer that has finished since the last call."""
        for transfer in self._transfers.finished():
            self._finish(transfer)

    def close(self) -> None:
        """Stop the copy engine; keep what the persistent store lacks; delete scratch files."""
        self.copy.close()
        try:
            self.tiers.persist(self._objects.values())
        finally:
            self.tiers.close()

    def summary(self) -> dict[str, Any]:
        """The run's memory totals for ``summary.json``, and what is held now (objects
        registered and resident, bytes used on the device and the host)."""
        out = self.totals.summary(self.policy.name, self.device_bytes, self.copy.busy_s,
                                  self.tiers.written)
        out.update(objects=len(self._objects), resident_objects=len(self._device.resident),
                   device_used_bytes=self.device_used, host_used_bytes=self.host_used)
        if self.tiers.store is not None:
            out["kv_store"] = self.tiers.store.summary()
        return out

    # -- loading ------------------------------------------------------------------------------

    def _issue(self, obj: AgentMemory, *, urgent: bool, distance: float) -> Transfer | None:
        transfer = self._transfers.start(obj, urgent=urgent, distance=distance)
        if transfer is not None:
            self._device.reserve(obj)
        return transfer

    def _preload(self, obj: AgentMemory) -> None:
        """Install ``obj`` as if it had been resident from the start (the ``infinite`` bound)."""
        if obj.device is not None:
            return
        start = time.perf_counter()
        # Free under a model of the hardware; else from a copy (the host, the store) or the
        # object's own origin when that can be read anywhere (an adapter file). What only the
        # model can compute (a persona not in the store) loads on first use, as in `unlimited`.
        tensors, source = obj.preload(), "origin"
        if tensors is None and obj.host is not None:
            tensors, source = obj.host, "host"
        if tensors is None and obj.disk_path is not None:
            try:
                tensors, source = read_object(obj.disk_path, obj.identity), "disk"
            except (CorruptObjectFile, OSError):
                self.totals.corrupt += 1
                self.tiers.discard_disk(obj)
        if tensors is None and obj.threadsafe:
            tensors, source = obj.materialize(), obj.origin
        if tensors is None:
            return
        self._device.reserve(obj)
        obj.device = obj.on_device({k: v.to(self.device) for k, v in tensors.items()})
        self._device.install(obj)
        self.totals.read_bytes[source] += obj.nbytes
        self.totals.preload_s += time.perf_counter() - start
        self._log(obj, "preload", source, "device", "resident from start", math.inf)

    def _urgent_load(self, obj: AgentMemory) -> Transfer | None:
        """Start the demand load of ``obj`` (promoting a prefetch); None if recomputed inline."""
        transfer = self._transfers.get(obj.key)
        if transfer is not None:
            self._transfers.promote(transfer)
            return transfer
        transfer = self._issue(obj, urgent=True, distance=0.0)
        if transfer is None:  # only the model's thread can rebuild it: do it now
            self._device.reserve(obj)
            start = self.copy.now()
            tensors = obj.materialize()
            obj.device = obj.on_device({k: v.to(self.device, copy=True)
                                        for k, v in tensors.items()})
            seconds = self.copy.now() - start
            self.totals.stall_by_source["recompute"] += seconds
            self._installed(obj, "recompute", "recompute", "miss", 0.0, seconds)
        return transfer

    def _wait(self, obj: AgentMemory, transfer: Transfer) -> None:
        while True:
            start = self.copy.now()
            transfer.done.wait()
            self.totals.stall_by_source[transfer.source] += self.copy.now() - start
            self._finish(transfer)
            if obj.device is not None:
                return
            if _disk_copy_failed(transfer):
                again = self._urgent_load(obj)  # the disk copy is gone: its origin, or recompute
            elif transfer.error is not None:
                raise RequestError(f"loading memory object {obj.key!r} failed: {transfer.error}")
            else:  # a prefetch aborted just before we promoted it: load it again, urgently
                again = self._issue(obj, urgent=True, distance=0.0)
            if again is None:
                return  # recomputed on this thread
            transfer = again

    def _finish(self, transfer: Transfer) -> None:
        obj = transfer.obj
        if not self._transfers.take(transfer):
            return
        if transfer.aborted or transfer.error is not None or transfer.result is None:
            self._device.unreserve(obj)
            op = "abort" if transfer.aborted else "error"
            if _disk_copy_failed(transfer):
                op = "corrupt"  # never used; the object is rebuilt from its origin
                self.totals.corrupt += 1
                self.tiers.discard_disk(obj)
            self._log(obj, op, transfer.source, "none", "preempted" if transfer.aborted
                      else str(transfer.error), transfer.distance)
            return
        obj.device = obj.on_device(transfer.result)
        op = "load" if transfer.urgent else "prefetch"
        self._installed(obj, op, transfer.source, "miss" if transfer.urgent else "distance",
                        transfer.distance, transfer.seconds)

    def _installed(self, obj: AgentMemory, op: str, tier_from: str, cause: str,
                   distance: float, seconds: float) -> None:
        self._device.install(obj)
        t = self.totals
        t.bytes_loaded += obj.nbytes
        if op == "load":
            t.bytes_on_demand += obj.nbytes
        elif op == "prefetch":
            t.bytes_prefetched += obj.nbytes
        else:
            t.bytes_recomputed += obj.nbytes
        t.copy_s += seconds
        t.read_bytes[tier_from] += obj.nbytes
        self._log(obj, op, tier_from, "device", cause, distance)

    def _distance_changed(self, agent: str) -> None:
        """The source re-estimated ``agent``: re-rank its resident, unpinned objects."""
        if self.policy.uses_distance:
            self._stale[agent] = None

    def _rerank_stale(self) -> None:
        """Re-rank the objects of every agent re-estimated since the index was last read.

        An agent is re-estimated several times between two reads (each wake-up, call and
        return): re-ranking once, when the index is about to be read, gives the same order
        (ranks are read from the source's current keys, ties broken by registration order)
        for a fraction of the heap pushes."""
        if not self._stale:
            return
        objects, by_agent = self._objects, self._by_agent
        self._device.rerank_all([objects[key] for agent in self._stale
                                 for key in by_agent.get(agent, ())])
        self._stale.clear()

    # -- prefetching --------------------------------------------------------------------------

    def _prefetch(self, source: DistanceSource) -> None:
        """Bring in the nearest agents' missing objects, as far as farther objects can make room."""
        # The nearest agents include those already running (distance 0, objects pinned): look
        # past them, or a busy engine would never prefetch for anyone who is about to call.
        self._rerank_stale()
        for agent in source.nearest(self.lookahead + len(self._owners)):
            for key in self._by_agent.get(agent, ()):
                obj = self._objects[key]
                if obj.device is not None or key in self._transfers or obj.nbytes > self.device_bytes:
                    continue
                if not Tiers.copyable(obj):
                    continue  # only the model's thread can rebuild it; done on demand
                distance = self.distance_of(obj)
                plan = self._device.plan_room(obj.nbytes, protect={key}, farther_than=distance)
                if plan is None:
                    return  # everything resident is nearer than what is left to fetch
                self._carry_out(plan, {key})
                self._issue(obj, urgent=False, distance=distance)

    # -- evicting -----------------------------------------------------------------------------

    def _carry_out(self, plan: EvictionPlan, protect: set[str]) -> None:
        """Evict the plan's victims, then abort its prefetches (the host copies in ``protect``
        stay while the tiers make host room)."""
        for obj in plan.victims:
            self._evict(obj, cause="budget", protect=protect)
        for t in plan.aborts:
            self._transfers.abort(t)
            self._finish(t)
            if t.obj.device is not None:  # it finished before the abort reached it
                self._evict(t.obj, cause="budget", protect=protect)

    def _evict(self, obj: AgentMemory, cause: str, protect: Iterable[str] = frozenset()) -> None:
        """Take ``obj`` off the device, keeping a host or disk copy where one is worth keeping."""
        distance = self.distance_of(obj)
        # Read the contents before the engine frees them, unless a copy below already exists
        # (objects are immutable: a host or disk copy written earlier is still good).
        wanted = obj.host is None and (obj.disk_path is None or self.tiers.host_bytes > 0)
        tensors = obj.device_tensors() if wanted else {}
        obj.device = None
        obj.off_device()
        self._device.remove(obj)
        self.totals.evictions += 1
        tier, moved = self.tiers.keep(obj, tensors, **self._host_room(protect))
        self._report(moved)
        self._log(obj, "drop" if tier == "none" else "evict", "device", tier, cause, distance)

    def _host_room(self, protect: Iterable[str] = frozenset()) -> dict[str, Any]:
        """What the tiers need to make host room: the host copies not in ``protect`` that may
        go, and the policy's rank of them."""
        protected = set(protect)
        return {"held": (o for o in self._objects.values()
                         if o.host is not None and o.key not in protected),
                "rank": lambda o: self.policy.eviction_rank(o, self.distance_of)}

    # -- reporting ----------------------------------------------------------------------------

    def _log(self, obj: AgentMemory, op: str, tier_from: str, tier_to: str, cause: str,
             distance: float) -> None:
        if not self.listeners:
            return
        event = MemoryEvent(wall=time.perf_counter(), object=obj.key, kind=obj.kind, op=op,
                            bytes=obj.nbytes, tier_from=tier_from, tier_to=tier_to, cause=cause,
                            distance=float(distance))
        for listener in self.listeners:
            listener(event)

    def _report(self, moved: list[Moved]) -> None:
        """Report what the tiers moved."""
        for m in moved:
            self._log(m.obj, m.op, m.tier_from, m.tier_to, m.cause, self.distance_of(m.obj))

    def check(self) -> None:
        """Assert the manager's invariants (tests call this after every operation)."""
        self._rerank_stale()
        self._device.check()  # the budget, the reservations, the index
        resident = self._device.resident
        assert self._device.reserved.keys() == {t.obj.key for t in self._transfers}, \
            "a load under way without its bytes reserved, or a reservation without a load"
        on_device = [o for o in self._objects.values() if o.device is not None]
        assert len(on_device) == len(resident)
        assert self.tiers.host_used <= self.tiers.host_bytes
        assert self.tiers.host_used == sum(o.nbytes for o in self._objects.values()
                                           if o.host is not None), "host copies uncounted"
        holders: Counter[str] = Counter()
        for owner, objs in self._owners.items():
            assert all(o.device is not None for o in objs), owner
            holders.update(o.key for o in objs)
        for obj in self._objects.values():
            assert obj.pins == holders[obj.key], (obj.key, obj.pins, holders[obj.key])
