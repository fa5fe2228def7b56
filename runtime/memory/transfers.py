"""The loads under way: one :class:`~runtime.memory.copy_engine.Transfer` per object at most.

:class:`Transfers` starts a load of an object from wherever the
:class:`~runtime.memory.tiers.Tiers` say a copy can be read (host, disk, its own file), keeps it
until the manager installs or discards it, promotes a prefetch that a request now waits for, and
aborts prefetches when an urgent load needs their room. The device bytes of every transfer here
are reserved in the :class:`~runtime.memory.residency.Residency` while the copy runs.
"""

from __future__ import annotations

from typing import Iterator

from runtime.memory.copy_engine import CopyLink, Transfer
from runtime.memory.objects import AgentMemory
from runtime.memory.tiers import Tiers


class Transfers:
    """In-flight loads over ``link``, by object key."""

    def __init__(self, link: CopyLink, tiers: Tiers) -> None:
        self.link, self._tiers = link, tiers
        self._by_key: dict[str, Transfer] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[Transfer]:
        return iter(list(self._by_key.values()))

    def get(self, key: str) -> Transfer | None:
        return self._by_key.get(key)

    def start(self, obj: AgentMemory, *, urgent: bool, distance: float) -> Transfer | None:
        """Queue a load of ``obj``; ``None`` when no copy exists (only a recompute can help)."""
        source = self._tiers.source_of(obj)
        if source is None:
            return None
        transfer = Transfer(obj, source[0], source[1], urgent=urgent, distance=distance)
        self._by_key[obj.key] = transfer
        return self.link.submit(transfer)

    def promote(self, transfer: Transfer) -> None:
        self.link.promote(transfer)

    def finished(self) -> list[Transfer]:
        """Transfers that are done (loaded, aborted or failed) and not yet taken."""
        return [t for t in self._by_key.values() if t.done.is_set()]

    def take(self, transfer: Transfer) -> bool:
        """Hand ``transfer`` over to be installed; ``False`` if it is no longer the current one."""
        if self._by_key.get(transfer.obj.key) is not transfer:
            return False
        del self._by_key[transfer.obj.key]
        return True

    def prefetches(self, protect: set[str]) -> Iterator[Transfer]:
        """Queued or running prefetches not in ``protect``, farthest first (sorted when first
        read: an urgent load needs them only if evictions alone cannot make its room)."""
        yield from sorted((t for t in self._by_key.values()
                           if not t.urgent and t.obj.key not in protect),
                          key=lambda t: t.distance, reverse=True)

    def abort(self, transfer: Transfer) -> None:
        """Cancel a prefetch and wait until it has stopped."""
        self.link.cancel(transfer)
        transfer.done.wait()
