"""Memory admission: the one owner of a request's agent memory, from submission to release.

:class:`MemoryAdmission` stands between the scheduler and the
:class:`~runtime.memory.MemoryManager`. At submission it asks the executor for the request's
memory objects (its adapter, the cached prefix segments its tokens match) and registers them, so
the manager can prefetch them before the request is admitted. When the scheduler admits the
request it names them again (the prefix cache may have grown meanwhile) and pins them
(:meth:`admit`, loading what is missing); when the request finishes it unpins them
(:meth:`release`). It is the only writer of the request's :class:`~runtime.request.MemoryStats`:
the manager's verdict per object, except for the prefix, which is one hit or one miss per call
however many segments of the prefix cache it spans (:meth:`MemoryAdmission._prefix_verdict`)."""

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
        # Named again: the prefix cache may hold more of the prompt than at submission.
        self.register(seq)
        try:
            stats = self.manager.acquire(seq.request_id, seq.memory_objects)
        except (WorkingSetTooLarge, RequestError) as exc:
            seq.fail(str(exc))
            return False
        if stats is None:
            return False
        self._stats[seq.request_id] = stats
        return True

    def withdraw(self, seq: Sequence) -> None:
        """``seq`` was admitted but could not start (no KV blocks): unpin its objects without
        writing statistics; its next :meth:`admit` acquires them again."""
        if self._stats.pop(seq.request_id, None) is not None:
            self.manager.release(seq.request_id)

    def release(self, seq: Sequence) -> None:
        """Unpin a finished sequence's objects and write its memory statistics."""
        stats = self._stats.pop(seq.request_id, None)
        if stats is None:
            return
        self.manager.release(seq.request_id)
        if seq.prefix_hit is not None:
            self._prefix_verdict(seq, stats)
        seq.memory = stats

    def _prefix_verdict(self, seq: Sequence, stats: MemoryStats) -> None:
        """One hit or one miss for the call's prefix, however many segments it spans: a hit
        when the first lookup reused all of the persona's full blocks (at least one block) and
        every segment it reused was resident when needed, else a miss (nothing cached yet, a
        segment loaded from below or being recomputed, or only part of the persona cached).
        The manager counted each segment it acquired; its totals are set to agree."""
        hit = bool(seq.prefix_hit) and not stats.misses.get("prefix_kv")
        counted = stats.hits.pop("prefix_kv", 0), stats.misses.pop("prefix_kv", 0)
        (stats.hits if hit else stats.misses)["prefix_kv"] = 1
        self.manager.totals.hits += int(hit) - counted[0]
        self.manager.totals.misses += int(not hit) - counted[1]

    def reclaim_prefix_blocks(self, block_nbytes: int) -> Callable[[int], bool]:
        """A scheduler's ``reclaim``: evict cached prefix segments worth ``blocks`` KV blocks."""
        return lambda blocks: self.manager.reclaim(blocks * block_nbytes, kind="prefix_kv") > 0

    def tick(self) -> None:
        """Between iterations: the manager installs finished copies and prefetches."""
        self.manager.tick()

    def close(self) -> None:
        self.manager.close()

    def __repr__(self) -> str:
        return f"<MemoryAdmission {self.manager.policy.name}, {len(self._stats)} held>"
