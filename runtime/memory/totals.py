"""What a memory manager did over a run: counts, bytes and seconds, as one dataclass."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MemoryTotals:
    """Totals of a :class:`~runtime.memory.MemoryManager` (seconds on its copy link's clock)."""

    hits: int = 0
    misses: int = 0
    stall_s: float = 0.0
    bytes_loaded: int = 0
    bytes_on_demand: int = 0
    bytes_prefetched: int = 0
    bytes_recomputed: int = 0
    #: bytes of newly computed KV the engine cached (prefix segments), at no copy cost
    bytes_cached: int = 0
    #: seconds the loads of installed objects took, recomputes on the model's thread included
    #: (``copy_busy_s`` in the summary is the link's busy time, aborted copies included)
    copy_s: float = 0.0
    evictions: int = 0
    #: bytes installed on the device, by where they came from (host, disk, an origin, recompute)
    read_bytes: Counter[str] = field(default_factory=Counter)
    #: seconds requests waited for their objects, by where the objects came from
    stall_by_source: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: objects found damaged on disk (rebuilt from their origin instead)
    corrupt: int = 0
    #: seconds spent installing objects resident from the start (the ``infinite`` bound)
    preload_s: float = 0.0

    def summary(self, policy: str, device_bytes: float, copy_busy_s: float,
                written: Counter[str]) -> dict[str, Any]:
        """The ``memory`` section of ``summary.json`` (JSON has no infinity: null = no limit).

        ``written`` are the bytes each tier below the device received."""
        accesses = self.hits + self.misses
        return {"policy": policy,
                "device_bytes": None if device_bytes == math.inf else int(device_bytes),
                "hit_rate": round(self.hits / accesses, 4) if accesses else None,
                "bytes_loaded": int(self.bytes_loaded),
                "bytes_prefetched": int(self.bytes_prefetched),
                "bytes_recomputed": int(self.bytes_recomputed),
                "bytes_cached": int(self.bytes_cached),
                "stall_s": round(self.stall_s, 4), "evictions": int(self.evictions),
                "copy_s": round(self.copy_s, 4), "copy_busy_s": round(copy_busy_s, 4),
                "tiers": {tier: {"read_bytes": int(self.read_bytes.get(tier, 0)),
                                 "written_bytes": int(written.get(tier, 0)),
                                 "stall_s": round(self.stall_by_source.get(tier, 0.0), 4)}
                          for tier in sorted(set(self.read_bytes) | set(written)
                                             | set(self.stall_by_source))},
                "corrupt_files": self.corrupt, "preload_s": round(self.preload_s, 4)}
