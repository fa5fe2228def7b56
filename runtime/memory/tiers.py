"""The tiers below the device: host memory (a byte budget) and a disk cache directory.

When an object leaves the device, :meth:`Tiers.keep` decides where its contents go: to the host
tier while its budget allows (pinned memory on CUDA), else to disk (safetensors; only for
objects that would otherwise need recomputing, since an adapter can be re-read from its own
file), else nowhere (the object is dropped and later rebuilt from its origin). Making room on
the host moves the host copies that the policy ranks first down to disk, or drops them.
:meth:`Tiers.source_of` says where a load can read an object from off the model's thread.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from runtime.memory.objects import AgentMemory, Tensors

#: ``log(obj, op, tier_from, tier_to, cause)``: the manager's row writer.
Log = Callable[[AgentMemory, str, str, str, str], None]


class Tiers:
    """Host budget ``host_bytes`` (``None``: no limit, 0: no host tier) and ``disk_dir``."""

    def __init__(self, host_bytes: int | None, disk_dir: str | Path | None,
                 pin: bool = False) -> None:
        self.host_bytes: float = math.inf if host_bytes is None else int(host_bytes)
        self.host_used = 0
        self.disk = Path(disk_dir) if disk_dir is not None else None
        if self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
        self._pin = pin

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
            path = str(obj.disk_path)
            from safetensors.torch import load_file

            return "disk", lambda: load_file(path)
        if obj.threadsafe:
            return obj.origin, obj.materialize
        return None

    def keep(self, obj: AgentMemory, tensors: Tensors, *, held: Iterable[AgentMemory],
             rank: Callable[[AgentMemory], Any], log: Log) -> str:
        """Store the contents of ``obj``, which leaves the device; return the tier (or "none").

        ``held`` are the objects whose host copies may make room, in any order; ``rank`` orders
        them (smallest first out).
        """
        if obj.host is not None:
            return "host"
        if not tensors:  # nothing was computed yet: nothing to keep
            return "none"
        if self._make_host_room(obj.nbytes, held, rank, log):
            obj.host = {k: self._to_host(v) for k, v in tensors.items()}
            self.host_used += obj.nbytes
            return "host"
        if self._to_disk(obj, tensors):
            return "disk"
        return "none"

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.to("cpu", copy=True)
        return copy.pin_memory() if self._pin else copy

    def _make_host_room(self, nbytes: int, held: Iterable[AgentMemory],
                        rank: Callable[[AgentMemory], Any], log: Log) -> bool:
        """Free host budget by moving host copies to disk or dropping them."""
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
            to = "disk" if self._to_disk(o, tensors) else "none"
            log(o, "evict" if to == "disk" else "drop", "host", to, "host budget")
        return True

    def take_host(self, obj: AgentMemory) -> Tensors:
        """Remove ``obj``'s host copy and return it."""
        tensors, obj.host = obj.host or {}, None
        self.host_used -= obj.nbytes
        return tensors

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

    def forget(self, obj: AgentMemory) -> None:
        """Drop every copy of ``obj`` below the device (its content changed)."""
        if obj.host is not None:
            self.take_host(obj)
        obj.disk_path = None
