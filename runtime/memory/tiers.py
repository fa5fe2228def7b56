"""The tiers below the device: host memory (a byte budget), a disk tier and the persistent store.

When an object leaves the device, :meth:`Tiers.keep` decides where its contents go: to the host
tier while its budget allows (pinned memory on CUDA), else to disk, else nowhere (the object is
dropped and later rebuilt from its origin). Only objects that would otherwise need recomputing
go to disk, since an adapter can be re-read from its own file. An object with an
:attr:`~runtime.memory.objects.AgentMemory.identity` goes to the persistent
:class:`~runtime.memory.kv_store.KVStore` when there is one (where a later run finds it too),
the others to the run's scratch directory ``disk_dir`` (emptied when the run ends). Disk files
are :mod:`~runtime.memory.object_file` files: direct I/O, checksummed.

The host budget counts every host copy, including those an object arrives with (an adapter's
weights, read when it is first named): :meth:`Tiers.adopt` places them under the budget or lets
them go. Making room on the host moves the host copies that the policy ranks first down to disk,
or drops them. Such moves are returned as :class:`Moved` records, which the manager reports
(the tiers report nothing themselves). :meth:`Tiers.source_of` says where a load can read an
object from off the model's thread; :attr:`Tiers.written` counts the bytes each tier received.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

from runtime.memory.kv_store import KVStore
from runtime.memory.object_file import read_object, write_object
from runtime.memory.objects import AgentMemory, Tensors

#: Where the disk copies of a modeled run "are": nothing is written there.
VIRTUAL_DISK = Path("<modeled disk>")


class Moved(NamedTuple):
    """A copy the tiers moved or let go (or found in the store), for the manager to report."""

    obj: AgentMemory
    #: ``found``, ``evict`` (to disk) or ``drop``
    op: str
    tier_from: str
    tier_to: str
    cause: str


class Tiers:
    """Host budget ``host_bytes`` (``None``: no limit, 0: no host tier), the scratch ``disk_dir``
    and the persistent ``store``."""

    def __init__(self, host_bytes: int | None, disk_dir: str | Path | None,
                 pin: bool = False, store: KVStore | None = None,
                 virtual_disk: bool = False) -> None:
        self.host_bytes: float = math.inf if host_bytes is None else int(host_bytes)
        self.host_used = 0
        self.disk = Path(disk_dir).expanduser() if disk_dir is not None else None
        #: a modeled disk: copies are recorded, never written (the objects are only sizes)
        self.virtual_disk = virtual_disk and (self.disk is not None or store is not None)
        if self.virtual_disk:
            self.disk, store = VIRTUAL_DISK, None
        elif self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
        self.store = store
        self._pin = pin
        #: bytes copied into each tier ("host", "disk")
        self.written: Counter[str] = Counter()
        self._scratch: set[Path] = set()

    @staticmethod
    def copyable(obj: AgentMemory) -> bool:
        """Whether ``obj`` can come back by a copy (host, disk, its own file), not a recompute."""
        return obj.host is not None or obj.disk_path is not None or obj.threadsafe

    def source_of(self, obj: AgentMemory) -> tuple[str, Callable[[], Tensors]] | None:
        """Where a copy of ``obj`` can be read from off the model's thread (None: recompute)."""
        if obj.host is not None:
            host = obj.host
            return "host", lambda: host
        if obj.disk_path is not None:
            path, identity = obj.disk_path, obj.identity
            if self.virtual_disk:
                return "disk", dict
            return "disk", lambda: read_object(path, identity)
        if obj.threadsafe:
            return obj.origin, obj.materialize
        return None

    def adopt(self, obj: AgentMemory, *, held: Iterable[AgentMemory],
              rank: Callable[[AgentMemory], Any]) -> list[Moved]:
        """A newly registered object: find it in the store, and budget the host copy it came with.

        A host copy that does not fit moves to disk where a computed object's copies go, else
        it is let go (the object is re-read from its origin, or rebuilt). Returns what moved.
        """
        moved: list[Moved] = []
        if self.store is not None and obj.identity is not None and obj.disk_path is None:
            obj.disk_path = self.store.find(obj.identity)
            if obj.disk_path is not None:
                moved.append(Moved(obj, "found", "store", "disk", "persistent store"))
        if obj.host is None:
            return moved
        if self._make_host_room(obj.nbytes, held, rank, moved):
            if self._pin:  # loads from it go on the copy stream, asynchronously
                obj.host = {k: v if v.is_pinned() else self._to_host(v)
                            for k, v in obj.host.items()}
            self.host_used += obj.nbytes
            return moved
        tensors, obj.host = obj.host, None
        moved.append(self._off_host(obj, tensors))
        return moved

    def keep(self, obj: AgentMemory, tensors: Tensors, *, held: Iterable[AgentMemory],
             rank: Callable[[AgentMemory], Any]) -> tuple[str, list[Moved]]:
        """Store the contents of ``obj``, which leaves the device; return the tier it went to
        (or "none") and the host copies moved to make room for it.

        ``held`` are the objects whose host copies may make room, in any order; ``rank`` orders
        them (smallest first out).
        """
        moved: list[Moved] = []
        if obj.host is not None:
            return "host", moved
        if tensors and self._make_host_room(obj.nbytes, held, rank, moved):
            obj.host = {k: self._to_host(v) for k, v in tensors.items()}
            self.host_used += obj.nbytes
            self.written["host"] += obj.nbytes
            return "host", moved
        if obj.disk_path is not None and obj.origin == "recompute":
            return "disk", moved  # written earlier; objects are immutable
        if not tensors:  # nothing was computed yet: nothing to keep
            return "none", moved
        if self._to_disk(obj, tensors):
            return "disk", moved
        return "none", moved

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor``, in page-locked memory where pinning is on (one copy)."""
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
        return copy.copy_(tensor)

    def _make_host_room(self, nbytes: int, held: Iterable[AgentMemory],
                        rank: Callable[[AgentMemory], Any], moved: list[Moved]) -> bool:
        """Free host budget by moving host copies to disk or dropping them (into ``moved``)."""
        if nbytes > self.host_bytes:
            return False
        short = self.host_used + nbytes - self.host_bytes
        if short <= 0:
            return True
        candidates = list(held)
        if sum(o.nbytes for o in candidates) < short:
            return False
        candidates.sort(key=rank)
        for o in candidates:
            if short <= 0:
                break
            tensors = self.take_host(o)
            short -= o.nbytes
            moved.append(self._off_host(o, tensors))
        return True

    def _off_host(self, obj: AgentMemory, tensors: Tensors) -> Moved:
        """``obj``'s host copy ``tensors`` went for want of host room: to disk, or nowhere."""
        to = "disk" if self._to_disk(obj, tensors) else "none"
        return Moved(obj, "evict" if to == "disk" else "drop", "host", to, "host budget")

    def take_host(self, obj: AgentMemory) -> Tensors:
        """Remove ``obj``'s host copy and return it."""
        tensors, obj.host = obj.host or {}, None
        self.host_used -= obj.nbytes
        return tensors

    def _to_disk(self, obj: AgentMemory, tensors: Tensors) -> bool:
        """Write a disk copy when there is a disk tier and the object cannot just be re-read."""
        if obj.origin != "recompute" or not tensors:
            return False
        if obj.disk_path is not None:
            return True  # objects are immutable: the copy written earlier is still good
        if self.virtual_disk:
            obj.disk_path = VIRTUAL_DISK / obj.key
        elif self.store is not None and obj.identity is not None:
            obj.disk_path = self.store.put(obj.identity, tensors)
        elif self.disk is not None:
            path = self.disk / (hashlib.sha1(obj.key.encode()).hexdigest()[:20] + ".obj")
            write_object(path, tensors, obj.identity)
            obj.disk_path = path
            self._scratch.add(path)
        else:
            return False
        self.written["disk"] += obj.nbytes
        return True

    def persist(self, objects: Iterable[AgentMemory]) -> int:
        """Write every computed object with an identity that the store lacks (end of a run);
        return how many were written."""
        if self.store is None:
            return 0
        written = 0
        for obj in objects:
            if obj.identity is None or obj.origin != "recompute":
                continue
            if obj.disk_path is not None and obj.disk_path not in self._scratch:
                continue
            tensors = obj.host if obj.host is not None else \
                obj.device_tensors() if obj.device is not None else {}
            if tensors:
                obj.disk_path = self.store.put(obj.identity, tensors)
                self.written["disk"] += obj.nbytes
                written += 1
        return written

    def discard_disk(self, obj: AgentMemory) -> None:
        """``obj``'s disk copy is unusable (damaged, truncated, someone else's): delete it."""
        path, obj.disk_path = obj.disk_path, None
        if path is None:
            return
        if self.store is not None and path.parent == self.store.directory:
            self.store.discard(path)
        else:
            path.unlink(missing_ok=True)
            self._scratch.discard(path)

    def forget(self, obj: AgentMemory) -> None:
        """Drop every copy of ``obj`` below the device (its content changed)."""
        if obj.host is not None:
            self.take_host(obj)
        if obj.disk_path in self._scratch:
            self.discard_disk(obj)
        obj.disk_path = None

    def close(self) -> None:
        """Delete the run's scratch files (the store's entries stay for later runs)."""
        for path in self._scratch:
            path.unlink(missing_ok=True)
        self._scratch.clear()
