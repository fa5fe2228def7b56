"""Invocation distances sent to engine replicas: the driver's feed and each replica's copy.

One oracle (a watchable :class:`~runtime.memory.OrderedDistanceSource`) lives with the
simulation; each replica's memory manager must see the distances of its own agents. The
:class:`DistanceFeed` on the driver watches the oracle and keeps, per replica, the agents whose
order key changed since that replica was last called; :meth:`DistanceFeed.take` turns them into
two arrays (agent ids and their keys, a ``float64`` array), which travel in the replica's one
call of the iteration. On the replica, :class:`ReplicaDistances` applies them and is itself an
:class:`~runtime.memory.OrderedDistanceSource`, so the memory policies read it unchanged:

* ``order_key(a)``: the oracle's key (the estimated call time), or ``-inf`` while ``a`` has a
  request on this replica;
* ``distance(a)``: 0 for a request in flight, else ``max(0, key - now)`` with the driver's clock;
* ``nearest(k)``: requests in flight first (in the order they arrived), then the smallest keys,
  from a lazy heap: O(k log n).

The requests in flight are kept by :class:`~runtime.memory.distance.CallTrackingSource`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from runtime.memory.distance import CallTrackingSource, OrderedDistanceSource
from runtime.memory.lazy_heap import LazyHeap


class DistanceFeed:
    """Collects, per replica, the agents whose order key changed (driver side)."""

    def __init__(self, source: OrderedDistanceSource, home: Callable[[str], int],
                 replicas: int) -> None:
        self.source = source
        self._home = home
        self._changed: list[dict[str, None]] = [{} for _ in range(replicas)]
        source.watch(self._on_change)

    def _on_change(self, agent_id: str) -> None:
        self._changed[self._home(agent_id)][agent_id] = None

    def pending(self, replica: int) -> int:
        """How many changed agents wait to be sent to ``replica``."""
        return len(self._changed[replica])

    def take(self, replica: int) -> tuple[list[str], np.ndarray]:
        """The changed agents of ``replica`` and their current keys, as arrays; then forgets
        them."""
        changed = self._changed[replica]
        if not changed:
            return [], np.empty(0, dtype=np.float64)
        agents = list(changed)
        changed.clear()
        key = self.source.order_key
        return agents, np.fromiter((key(a) for a in agents), dtype=np.float64, count=len(agents))

    def reassign(self, agent_ids: Sequence[str]) -> None:
        """Queue ``agent_ids`` for their (new) home replica, e.g. after a fail-over."""
        for agent in agent_ids:
            self._on_change(agent)


class ReplicaDistances(CallTrackingSource):
    """The distances one replica's memory manager reads (replica side; see the module doc).

    Its pending calls are the requests in flight on this replica; what it predicts is the
    driver's keys.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._keys: dict[str, float] = {}
        self._heap: LazyHeap[str] = LazyHeap()

    def update(self, now: float, agents: Sequence[str], keys: np.ndarray) -> None:
        """Apply the driver's clock and the changed keys of ``agents``."""
        self.now = float(now)
        heap, versions = self._heap, self._heap.versions
        for agent, key in zip(agents, keys.tolist()):
            if math.isinf(key) and key > 0:
                self._keys.pop(agent, None)
                versions.drop(agent)
            else:
                self._keys[agent] = key
                heap.push((key, versions.stamp(agent), agent))
            self._changed(agent)

    def _predicted_key(self, agent_id: str) -> float:
        return self._keys.get(agent_id, math.inf)

    def _predicted_distance(self, agent_id: str) -> float:
        return max(0.0, self._keys.get(agent_id, math.inf) - self.now)

    def _nearest_predicted(self, k: int) -> list[str]:
        # The heap holds agents in flight too (their keys keep arriving): look past them.
        return [e[-1] for e in self._heap.smallest(k, skip=self._pending)]
