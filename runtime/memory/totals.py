"""What a memory manager did over a run: counts, bytes and seconds, as one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    copy_s: float = 0.0
    evictions: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, policy: str, device_bytes: float, copy_busy_s: float) -> dict[str, Any]:
        """The ``memory`` section of ``summary.json`` (JSON has no infinity: null = no limit)."""
        accesses = self.hits + self.misses
        return {"policy": policy,
                "device_bytes": None if device_bytes == math.inf else int(device_bytes),
                "hit_rate": round(self.hits / accesses, 4) if accesses else None,
                "bytes_loaded": int(self.bytes_loaded),
                "bytes_prefetched": int(self.bytes_prefetched),
                "stall_s": round(self.stall_s, 4), "evictions": int(self.evictions),
                "copy_busy_s": round(copy_busy_s, 4)}
