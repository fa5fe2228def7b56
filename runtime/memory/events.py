"""What the memory manager reports: one typed record per memory operation.

Every load, prefetch, abort, eviction, drop, recompute, store hit or corrupt-file repair is one
:class:`MemoryEvent`, handed to the manager's listeners as it happens. Its fields are the columns
of a run's ``memory.parquet`` except ``sim_time``, which the front end adds (the simulation's
clock, or the server's): :meth:`MemoryEvent.row` gives them as the recorder's row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    """One memory operation on one object (see the module docstring)."""

    #: ``time.perf_counter()`` when it happened
    wall: float
    #: the object's key and kind (``adapter``, ``prefix_kv``, ``model``, a world's own kind)
    object: str
    kind: str
    #: ``load``, ``prefetch``, ``abort``, ``evict``, ``drop``, ``recompute``, ``found``, ...
    op: str
    bytes: int
    tier_from: str
    tier_to: str
    #: why: ``demand``, ``prefetch``, ``room``, ``preload``, ...
    cause: str
    #: the object's invocation distance when it happened (``inf``: unknown)
    distance: float

    def row(self) -> dict[str, Any]:
        """The record as a ``memory.parquet`` row (without ``sim_time``)."""
        # Every field is a plain number or string: no deep copy (``dataclasses.asdict``),
        # which cost a run with a prefix cache ~4% of its CPU (one row per memory event).
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS = tuple(f.name for f in fields(MemoryEvent))
