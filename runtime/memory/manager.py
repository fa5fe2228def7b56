"""The memory manager: which agent memory objects are on the device, and moving them there.

The engine calls it at three points of every iteration::

    stats = memory.acquire(request_id, objects)   # before: pin, load what is missing (may wait)
    ... forward the batch ...
    memory.release(request_id)                     # after: unpin
    memory.tick()                                  # between: finish transfers, evict, prefetch

:meth:`MemoryManager.acquire` makes a request's objects resident and pins them; objects already on
the device are *hits*, the others *misses* that are loaded urgently (preempting prefetches) while
the request waits — that wait is its *stall*. If the device budget is full of objects pinned by
other running requests it returns ``None`` and the engine retries the request at a later iteration;
if the request's own objects can never fit, it raises :class:`WorkingSetTooLarge`.

Space is made by evicting unpinned objects in the policy's order. The order is kept in an
*eviction index*: a heap of the resident unpinned objects keyed by the policy's rank, with lazy
invalidation (an object whose rank changes is pushed again under a new version; stale entries are
skipped when popped). An eviction therefore costs O(log n), not a sort of every resident object.
Ranks change on access, load, pin and release, which the manager sees, and with distances, which
it learns from a source that can be *watched* (``order_key`` + ``watch``, see
:mod:`runtime.memory.distance`); for a source that cannot, the index is rebuilt before each
eviction (the old full sort). An evicted object keeps a host
copy when the host budget allows (pinned memory on CUDA), else a disk copy (safetensors, for
objects that would otherwise need recomputing), else it is dropped and later rebuilt from its
origin. With a distance-driven policy, :meth:`MemoryManager.tick` prefetches the objects of the
agents nearest to calling and never evicts an object nearer than the one it brings in, nor
one that only a recompute could bring back (a dropped prefix KV): a prefetch hides one copy,
a wrong guess there would cost a whole prefill.

Every load, prefetch, abort, eviction, drop and recompute is reported to :attr:`listeners` as one
row (the columns of the run's ``memory.parquet`` except ``sim_time``, which the simulation adds).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

from runtime.memory.copy_engine import CopyEngine, Transfer
from runtime.memory.distance import DistanceSource
from runtime.memory.objects import AgentMemory, Tensors
from runtime.memory.policies import Policy, make_policy
from runtime.request import MemoryStats, RequestError


class WorkingSetTooLarge(RequestError):
    """One request needs more device memory than the whole device budget."""


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class MemoryManager:
    """Device, host and disk tiers under one policy; see the module docstring.

    ``device_bytes=None`` (or the ``infinite`` policy) means no device limit and
    ``host_bytes=None`` no host limit; ``host_bytes=0`` disables the host tier. ``disk_dir``
    enables the disk tier. ``lookahead`` is how many nearest agents a prefetch pass considers
    besides those whose requests already hold their objects.
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
    ) -> None:
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.device = torch.device(device)
        unlimited = self.policy.unlimited or device_bytes is None
        self.device_bytes: float = math.inf if unlimited else int(device_bytes)
        if not self.policy.keep_between_calls:
            host_bytes, disk_dir = 0, None  # `none` keeps nothing anywhere
        self.host_bytes: float = math.inf if host_bytes is None else int(host_bytes)
        self.disk = Path(disk_dir) if disk_dir is not None else None
        if self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
        self.lookahead = lookahead
        self.copy = CopyEngine(self.device, link_gbps=link_gbps, link_latency_us=link_latency_us,
                               chunk_bytes=chunk_bytes)
        self.objects: dict[str, AgentMemory] = {}
        self.by_agent: dict[str, list[str]] = defaultdict(list)
        self.resident: dict[str, AgentMemory] = {}
        self.inflight: dict[str, Transfer] = {}
        self.owners: dict[Hashable, list[AgentMemory]] = {}
        #: device bytes of resident objects plus those reserved by in-flight transfers
        self.device_used = 0
        self.host_used = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.totals: dict[str, float] = defaultdict(float)
        #: how "now" is read for stall times (a modeled executor swaps in its virtual clock)
        self.clock: Callable[[], float] = time.perf_counter
        # The eviction index: heap of (rank, serial, version, key); an entry is live while
        # _version[key] equals its version (only resident, unpinned objects have one).
        self._index: list[tuple[Any, int, int, str]] = []
        # The same entries for the objects a copy can bring back: a prefetch may evict only
        # those, and scanning past dropped prefix KV in the main heap made every prefetch O(n).
        self._copy_index: list[tuple[Any, int, int, str]] = []
        self._version: dict[str, int] = {}
        self._serial: dict[str, int] = {}
        self._versions = itertools.count()
        self._order_key: Callable[[str], float] | None = None
        self._indexed = True
        self.distance = distance

    @property
    def distance(self) -> DistanceSource | None:
        """Where invocation distances come from; a watchable source keeps the index current."""
        return self._distance

    @distance.setter
    def distance(self, source: DistanceSource | None) -> None:
        self._distance = source
        order_key = getattr(source, "order_key", None)
        watch = getattr(source, "watch", None)
        self._order_key = order_key if watch is not None else None
        if self._order_key is not None:
            watch(self._distance_changed)
        # Without notifications a distance rank can go stale unseen: rebuild before evicting.
        self._indexed = not self.policy.uses_distance or source is None or \
            self._order_key is not None
        self._rebuild_index()

    # -- objects ------------------------------------------------------------------------------

    def register(self, obj: AgentMemory, users: Iterable[str] = ()) -> AgentMemory:
        """Make ``obj`` known (once per key: a shared object is stored once) and add its users."""
        known = self.objects.setdefault(obj.key, obj)
        if known is obj and obj.key not in self._serial:
            self._serial[obj.key] = len(self._serial)
        for user in users:
            if user not in known.users:
                known.users.add(user)
                self.by_agent[user].append(known.key)
        return known

    def distance_of(self, obj: AgentMemory) -> float:
        """The object's invocation distance: the nearest of its users (``inf`` without a source)."""
        if self.distance is None or not obj.users:
            return math.inf
        if len(obj.users) == 1:
            for user in obj.users:
                return self._distance.distance(user)
        return min(self._distance.distance(u) for u in obj.users)

    # -- the engine's three calls -------------------------------------------------------------

    def acquire(self, owner: Hashable, objects: Sequence[AgentMemory]) -> MemoryStats | None:
        """Pin ``objects`` for ``owner`` on the device, loading the missing ones (waits).

        Returns the request's :class:`MemoryStats`, or ``None`` if the device is too full of
        other requests' pinned objects right now (nothing is pinned then; retry later).
        """
        if owner in self.owners:
            raise RuntimeError(f"memory owner {owner!r} already holds its objects")
        objs = list({o.key: self.register(o) for o in objects}.values())
        needed = sum(o.nbytes for o in objs)
        if needed > self.device_bytes:
            parts = ", ".join(f"{o.kind} {o.key} {_mib(o.nbytes)}" for o in objs)
            raise WorkingSetTooLarge(
                f"request {owner}: its memory objects need {_mib(needed)} ({parts}) but the device "
                f"budget (runtime.memory.device_bytes) is {_mib(self.device_bytes)}")
        self.poll()
        stats = MemoryStats()
        keys = {o.key for o in objs}
        hits = [o for o in objs if o.device is not None]
        misses = [o for o in objs if o.device is None]
        for o in hits:
            o.pins += 1
            self._version.pop(o.key, None)  # pinned: out of the eviction index
        # Make room for every miss before loading any, so a failure leaves nothing half-loaded.
        need = sum(o.nbytes for o in misses if o.key not in self.inflight)
        if need and not self._make_room(need, protect=keys, urgent=True):
            for o in hits:
                self._unpin(o)
            return None
        for o in misses:
            o.pins += 1
        start = self.clock()
        try:
            pending = [self._urgent_load(o) for o in misses]
            for o, transfer in zip(misses, pending):
                if transfer is not None:
                    self._wait(o, transfer)
        except BaseException:
            for o in objs:
                self._unpin(o)
            raise
        stats.stall_s = self.clock() - start if misses else 0.0
        for o in objs:
            self.policy.on_access(o)
            bucket = stats.misses if o in misses else stats.hits
            bucket[o.kind] = bucket.get(o.kind, 0) + 1
        stats.bytes_loaded = sum(o.nbytes for o in misses)
        self.owners[owner] = objs
        self.totals["hits"] += len(hits)
        self.totals["misses"] += len(misses)
        self.totals["stall_s"] += stats.stall_s
        return stats

    def release(self, owner: Hashable) -> None:
        """Unpin ``owner``'s objects (the ``none`` policy drops them from the device here)."""
        for o in self.owners.pop(owner, ()):
            if o.pins == 1 and not self.policy.keep_between_calls and o.device is not None:
                o.pins = 0
                self._evict(o, cause="policy none")
            else:
                self._unpin(o)

    def _unpin(self, obj: AgentMemory) -> None:
        obj.pins -= 1
        if obj.pins == 0 and obj.device is not None:
            self._reindex(obj)

    def tick(self) -> None:
        """Between iterations: install finished transfers, then prefetch by distance."""
        self.poll()
        if self.policy.prefetch and self.distance is not None:
            self._prefetch()

    def tensors(self, obj: AgentMemory) -> Tensors:
        """The device tensors of a pinned object."""
        if obj.device is None:
            raise RuntimeError(f"memory object {obj.key!r} is not on the device (acquire it)")
        return obj.device

    def poll(self) -> None:
        """Install every transfer that has finished since the last call."""
        if self.inflight:
            for transfer in [t for t in self.inflight.values() if t.done.is_set()]:
                self._finish(transfer)

    def close(self) -> None:
        self.copy.close()

    # -- loading ------------------------------------------------------------------------------

    def _source_of(self, obj: AgentMemory) -> tuple[str, Callable[[], Tensors]] | None:
        """Where a copy of ``obj`` can be read from off the model's thread (None: recompute)."""
        if obj.host is not None:
            host = obj.host
            return "host", lambda: host
        if obj.disk_path is not None:
            path = str(obj.disk_path)
            from safetensors.torch import load_file

            return "disk", lambda: load_file(path)
        if obj.threadsafe:
            return obj.origin, obj.materialize
        return None

    @staticmethod
    def _copyable(obj: AgentMemory) -> bool:
        """Whether ``obj`` can come back by a copy (host, disk, its own file), not a recompute."""
        return obj.host is not None or obj.disk_path is not None or obj.threadsafe

    def _issue(self, obj: AgentMemory, *, urgent: bool, distance: float) -> Transfer | None:
        source = self._source_of(obj)
        if source is None:
            return None
        transfer = Transfer(obj, source[0], source[1], urgent=urgent, distance=distance)
        self.device_used += obj.nbytes  # reserved now, so the budget holds while it copies
        self.inflight[obj.key] = transfer
        return self.copy.submit(transfer)

    def _urgent_load(self, obj: AgentMemory) -> Transfer | None:
        """Start the demand load of ``obj`` (promoting a prefetch); None if recomputed inline."""
        transfer = self.inflight.get(obj.key)
        if transfer is not None:
            self.copy.promote(transfer)
            return transfer
        transfer = self._issue(obj, urgent=True, distance=0.0)
        if transfer is None:  # only the model's thread can rebuild it: do it now
            self.device_used += obj.nbytes
            start = self.clock()
            tensors = obj.materialize()
            obj.device = obj.on_device({k: v.to(self.device, copy=True)
                                        for k, v in tensors.items()})
            self._installed(obj, "recompute", "recompute", "miss", 0.0, self.clock() - start)
        return transfer

    def _wait(self, obj: AgentMemory, transfer: Transfer) -> None:
        while True:
            transfer.done.wait()
            self._finish(transfer)
            if obj.device is not None:
                return
            if transfer.error is not None:
                raise RequestError(f"loading memory object {obj.key!r} failed: {transfer.error}")
            # A prefetch aborted just before we promoted it: load it again, urgently.
            transfer = self._issue(obj, urgent=True, distance=0.0)
            assert transfer is not None

    def _finish(self, transfer: Transfer) -> None:
        obj = transfer.obj
        if self.inflight.get(obj.key) is not transfer:
            return
        del self.inflight[obj.key]
        if transfer.aborted or transfer.error is not None or transfer.result is None:
            self.device_used -= obj.nbytes
            op = "abort" if transfer.aborted else "error"
            self._log(obj, op, transfer.source, "none", "preempted" if transfer.aborted
                      else str(transfer.error), transfer.distance)
            return
        obj.device = obj.on_device(transfer.result)
        op = "load" if transfer.urgent else "prefetch"
        self._installed(obj, op, transfer.source, "miss" if transfer.urgent else "distance",
                        transfer.distance, transfer.seconds)

    def _installed(self, obj: AgentMemory, op: str, tier_from: str, cause: str,
                   distance: float, seconds: float) -> None:
        self.resident[obj.key] = obj
        self.policy.on_load(obj)
        if obj.pins == 0:
            self._reindex(obj)
        self.totals["bytes_loaded"] += obj.nbytes
        self.totals[f"bytes_{op}"] += obj.nbytes
        self.totals["copy_s"] += seconds
        self._log(obj, op, tier_from, "device", cause, distance)

    # -- making room --------------------------------------------------------------------------

    def _make_room(self, nbytes: int, *, protect: set[str], urgent: bool,
                   farther_than: float | None = None) -> bool:
        """Free ``nbytes`` of device budget by evicting (and, if urgent, aborting prefetches).

        Victims come off the eviction index in the policy's order. A prefetch (``farther_than``
        set) may only evict objects strictly farther than itself; under a distance policy the
        index pops in distance order, so the first nearer one ends the search. Nothing is
        evicted unless enough can be freed.
        """
        short = self.device_used + nbytes - self.device_bytes
        if short <= 0:
            return True
        if not self._indexed:
            self._rebuild_index()
        version, resident = self._version, self.resident
        index = self._index if farther_than is None else self._copy_index
        victims: list[tuple[Any, int, int, str]] = []
        aside: list[tuple[Any, int, int, str]] = []
        freed = 0
        while freed < short and index:
            entry = heapq.heappop(index)
            key = entry[3]
            if version.get(key) != entry[2]:
                continue  # stale: the object was re-ranked, pinned or evicted since
            obj = resident[key]
            if key in protect:
                aside.append(entry)
                continue
            if farther_than is not None:
                if not self.distance_of(obj) > farther_than:
                    aside.append(entry)
                    if self.policy.uses_distance:
                        break  # every object left in the index is at least as near
                    continue
                if not self._copyable(obj):
                    # Its host copy went since it was indexed. A prefetch saves one copy's
                    # latency; evicting what only a recompute can rebuild (a dropped prefix KV)
                    # costs a whole prefill if the prediction is wrong: only a demand load may.
                    continue
            victims.append(entry)
            freed += obj.nbytes
        prefetches: list[Transfer] = []
        if freed < short and urgent:
            queued = sorted((t for t in self.inflight.values()
                             if not t.urgent and t.obj.key not in protect),
                            key=lambda t: t.distance, reverse=True)
            for t in queued:
                if freed >= short:
                    break
                prefetches.append(t)
                freed += t.obj.nbytes
        for entry in aside:
            heapq.heappush(index, entry)
        if freed < short:
            for entry in victims:
                heapq.heappush(index, entry)
            return False
        for entry in victims:
            self._evict(resident[entry[3]], cause="budget", protect=protect)
        for t in prefetches:
            self.copy.cancel(t)
            t.done.wait()
            self._finish(t)
            if t.obj.device is not None:  # it finished before the abort reached it
                self._evict(t.obj, cause="budget", protect=protect)
        return True

    # -- the eviction index -------------------------------------------------------------------

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

    def _reindex(self, obj: AgentMemory) -> None:
        """(Re-)enter a resident unpinned object under its current rank."""
        version = next(self._versions)
        self._version[obj.key] = version
        entry = (self._rank(obj), self._serial[obj.key], version, obj.key)
        heapq.heappush(self._index, entry)
        if self._copyable(obj):
            heapq.heappush(self._copy_index, entry)
        limit = 2 * len(self._version) + 1024
        if len(self._index) > limit or len(self._copy_index) > limit:
            self._index = self._live(self._index)
            self._copy_index = self._live(self._copy_index)

    def _live(self, heap: list[tuple[Any, int, int, str]]) -> list[tuple[Any, int, int, str]]:
        """``heap`` without its stale entries, as a heap again."""
        live = [e for e in heap if self._version.get(e[3]) == e[2]]
        heapq.heapify(live)
        return live

    def _rebuild_index(self) -> None:
        self._version.clear()
        self._index, self._copy_index = [], []
        for obj in self.resident.values():
            if obj.pins == 0:
                version = next(self._versions)
                self._version[obj.key] = version
                entry = (self._rank(obj), self._serial[obj.key], version, obj.key)
                self._index.append(entry)
                if self._copyable(obj):
                    self._copy_index.append(entry)
        heapq.heapify(self._index)
        heapq.heapify(self._copy_index)

    def _distance_changed(self, agent: str) -> None:
        """The source re-estimated ``agent``: re-rank its resident, unpinned objects."""
        if not self.policy.uses_distance:
            return
        for key in self.by_agent.get(agent, ()):
            obj = self.objects[key]
            if obj.device is not None and obj.pins == 0:
                self._reindex(obj)

    def _evict(self, obj: AgentMemory, cause: str, protect: set[str] = frozenset()) -> None:
        """Take ``obj`` off the device, keeping a host or disk copy where one is worth keeping."""
        distance = self.distance_of(obj)
        # Read the contents before the engine frees them, unless a host copy already exists.
        tensors = obj.device_tensors() if obj.host is None else {}
        obj.device = None
        obj.off_device()
        del self.resident[obj.key]
        self._version.pop(obj.key, None)
        self.device_used -= obj.nbytes
        self.totals["evictions"] += 1
        if obj.host is not None:
            self._log(obj, "evict", "device", "host", cause, distance)
        elif not tensors:  # nothing was computed yet: nothing to keep
            self._log(obj, "drop", "device", "none", cause, distance)
        elif self._make_host_room(obj.nbytes, protect):
            pin = self.device.type == "cuda"
            obj.host = {k: v.to("cpu", copy=True).pin_memory() if pin else v.to("cpu", copy=True)
                        for k, v in tensors.items()}
            self.host_used += obj.nbytes
            self._log(obj, "evict", "device", "host", cause, distance)
        elif self._to_disk(obj, tensors):
            self._log(obj, "evict", "device", "disk", cause, distance)
        else:
            self._log(obj, "drop", "device", "none", cause, distance)

    def reclaim(self, nbytes: int, kind: str | None = None) -> int:
        """Evict unpinned resident objects (of ``kind``) in the policy's order until ``nbytes``
        are freed or none is left; return the bytes freed.

        The engine calls this when a pool the objects live in (the KV pool) runs short for
        running sequences, so the budget is not the only reason to let an object go.
        """
        if not self._indexed:
            self._rebuild_index()
        freed, aside = 0, []
        while freed < nbytes and self._index:
            entry = heapq.heappop(self._index)
            key = entry[3]
            if self._version.get(key) != entry[2]:
                continue
            obj = self.resident[key]
            if kind is not None and obj.kind != kind:
                aside.append(entry)
                continue
            self._evict(obj, cause="pool")
            freed += obj.nbytes
        for entry in aside:
            heapq.heappush(self._index, entry)
        return freed

    def forget(self, obj: AgentMemory) -> None:
        """Remove an unused object for good (its content changed: a new prefix, a new adapter)."""
        if obj.pins or obj.key in self.inflight:
            raise RuntimeError(f"memory object {obj.key!r} is in use; it cannot be forgotten")
        if obj.device is not None:
            self._evict(obj, cause="replaced")
        if obj.host is not None:
            obj.host = None
            self.host_used -= obj.nbytes
        obj.disk_path = None
        for user in obj.users:
            if obj.key in self.by_agent.get(user, ()):
                self.by_agent[user].remove(obj.key)
        if self.objects.get(obj.key) is obj:
            del self.objects[obj.key]

    def _make_host_room(self, nbytes: int, protect: set[str]) -> bool:
        """Free host budget by moving host copies to disk or dropping them (not ``protect``)."""
        if nbytes > self.host_bytes:
            return False
        short = self.host_used + nbytes - self.host_bytes
        if short <= 0:
            return True
        held = [o for o in self.objects.values() if o.host is not None and o.key not in protect]
        if sum(o.nbytes for o in held) < short:
            return False
        held.sort(key=lambda o: self.policy.eviction_rank(o, self.distance_of))
        for o in held:
            if short <= 0:
                break
            tensors, o.host = o.host, None
            self.host_used -= o.nbytes
            short -= o.nbytes
            if self._to_disk(o, tensors):
                self._log(o, "evict", "host", "disk", "host budget", self.distance_of(o))
            else:
                self._log(o, "drop", "host", "none", "host budget", self.distance_of(o))
        return True

    def _to_disk(self, obj: AgentMemory, tensors: Tensors) -> bool:
        """Write a disk copy when there is a disk tier and the object cannot just be re-read."""
        if self.disk is None or obj.origin != "recompute":
            return False
        if obj.disk_path is None:
            from safetensors.torch import save_file

            name = hashlib.sha1(obj.key.encode()).hexdigest()[:20] + ".safetensors"
            path = self.disk / name
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
            obj.disk_path = path
        return True

    # -- prefetching --------------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Bring in the nearest agents' missing objects, as far as farther objects can make room."""
        # The nearest agents include those already running (distance 0, objects pinned): look
        # past them, or a busy engine would never prefetch for anyone who is about to call.
        for agent in self.distance.nearest(self.lookahead + len(self.owners)):
            for key in self.by_agent.get(agent, ()):
                obj = self.objects[key]
                if obj.device is not None or key in self.inflight or obj.nbytes > self.device_bytes:
                    continue
                if not self._copyable(obj):
                    continue  # only the model's thread can rebuild it; done on demand
                distance = self.distance_of(obj)
                if not self._make_room(obj.nbytes, protect={key}, urgent=False,
                                       farther_than=distance):
                    return  # everything resident is nearer than what is left to fetch
                self._issue(obj, urgent=False, distance=distance)

    # -- reporting ----------------------------------------------------------------------------

    def _log(self, obj: AgentMemory, op: str, tier_from: str, tier_to: str, cause: str,
             distance: float) -> None:
        if not self.listeners:
            return
        row = {"wall": time.perf_counter(), "object": obj.key, "kind": obj.kind, "op": op,
               "bytes": obj.nbytes, "tier_from": tier_from, "tier_to": tier_to, "cause": cause,
               "distance": float(distance)}
        for listener in self.listeners:
            listener(row)

    def check(self) -> None:
        """Assert the manager's invariants (tests call this after every operation)."""
        resident = sum(o.nbytes for o in self.resident.values())
        reserved = sum(t.obj.nbytes for t in self.inflight.values())
        assert resident + reserved == self.device_used, (resident, reserved, self.device_used)
        assert self.device_used <= self.device_bytes, (self.device_used, self.device_bytes)
        assert all(o.device is not None for o in self.resident.values())
        on_device = [o for o in self.objects.values() if o.device is not None]
        assert len(on_device) == len(self.resident)
        assert self.host_used <= self.host_bytes
        for owner, objs in self.owners.items():
            assert all(o.device is not None for o in objs), owner
        # The eviction index holds exactly the resident unpinned objects, at their current rank.
        if not self._indexed:
            self._rebuild_index()
        live = {e[3]: e for e in self._index if self._version.get(e[3]) == e[2]}
        assert set(live) == set(self._version), "index versions without a live entry"
        unpinned = {k for k, o in self.resident.items() if o.pins == 0}
        assert set(live) == unpinned, (sorted(live), sorted(unpinned))
        for key, entry in live.items():
            assert entry[0] == self._rank(self.resident[key]), (key, entry[0])
        copy_live = {e[3] for e in self._copy_index if self._version.get(e[3]) == e[2]}
        assert copy_live <= set(live), "copy index holds an object the main index does not"
        assert {k for k in live if self._copyable(self.resident[k])} <= copy_live, \
            "a copyable resident object is missing from the copy index"
