"""Memory admission: the one owner of a request's agent memory, from submission to release.

:class:`MemoryAdmission` stands between the scheduler and the
:class:`~runtime.memory.MemoryManager`. At submission it asks the executor once for the
request's memory objects (its adapter, its agent's prefix KV) and registers them, so the manager
can prefetch them before the request is admitted. When the scheduler admits the request it pins
them (:meth:`admit`, loading what is missing); when the request finishes it unpins them
(:meth:`release`). It is the only writer of the request's :class:`~runtime.request.MemoryStats`:
the manager's verdict per object, except that a prefix KV the first prefix lookup could not reuse
(it was resident but still waiting to be recomputed, or the pool had no block for it) is a miss.
"""

from __future__ import annotations

from typing import Any, Callable

from runtime.memory import MemoryManager, WorkingSetTooLarge
from runtime.request import MemoryStats, RequestError
from runtime.sequence import Sequence


class MemoryAdmission:
    """Acquires each request's objects once and releases them once (see the module doc)."""

    def __init__(self, manager: MemoryManager,
                 memory_objects: Callable[[Sequence], list[Any]]) -> None:
        self.manager = manager
        self._memory_objects = memory_objects
        self._stats: dict[int, MemoryStats] = {}

    def register(self, seq: Sequence) -> None:
        """Name ``seq``'s objects (raises :class:`RequestError` for a bad one) and tell the
        manager who uses them."""
        seq.memory_objects = self._memory_objects(seq)
        for obj in seq.memory_objects:
            self.manager.register(obj, [seq.request.agent_id])

    def admit(self, seq: Sequence) -> bool:
        """Pin ``seq``'s objects (once); ``False`` if they cannot be placed now or never (then
        ``seq`` has failed)."""
        if seq.request_id in self._stats:
            return True  # a preempted sequence keeps its objects pinned
        try:
            stats = self.manager.acquire(seq.request_id, seq.memory_objects)
        except (WorkingSetTooLarge, RequestError) as exc:
            seq.fail(str(exc))
            return False
        if stats is None:
            return False
        self._stats[seq.request_id] = stats
        return True

    def release(self, seq: Sequence) -> None:
        """Unpin a finished sequence's objects and write its memory statistics."""
        stats = self._stats.pop(seq.request_id, None)
        if stats is None:
            return
        self.manager.release(seq.request_id)
        if seq.prefix_hit is False and stats.hits.pop("prefix_kv", 0):
            stats.misses["prefix_kv"] = stats.misses.get("prefix_kv", 0) + 1
        seq.memory = stats

    def reclaim_prefix_blocks(self, block_nbytes: int) -> Callable[[int], bool]:
        """A scheduler's ``reclaim``: evict cached prefix KV worth ``blocks`` KV blocks."""
        return lambda blocks: self.manager.reclaim(blocks * block_nbytes, kind="prefix_kv") > 0

    def tick(self) -> None:
        """Between iterations: the manager installs finished copies and prefetches."""
        self.manager.tick()

    def close(self) -> None:
        self.manager.close()

    def __repr__(self) -> str:
        return f"<MemoryAdmission {self.manager.policy.name}, {len(self._stats)} held>"
