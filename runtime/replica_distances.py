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
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from runtime.memory.distance import OrderedDistanceSource
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


class ReplicaDistances:
    """The distances one replica's memory manager reads (replica side; see the module doc)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._keys: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._heap: LazyHeap[str] = LazyHeap()
        self._watchers: list[Callable[[str], None]] = []

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
            self._notify(agent)

    def on_submit(self, agent_id: str) -> None:
        """A request of ``agent_id`` arrived at this replica."""
        self._in_flight[agent_id] = self._in_flight.get(agent_id, 0) + 1
        self._notify(agent_id)

    def on_finish(self, agent_id: str) -> None:
        """A request of ``agent_id`` finished here."""
        left = self._in_flight.get(agent_id, 0) - 1
        if left > 0:
            self._in_flight[agent_id] = left
        else:
            self._in_flight.pop(agent_id, None)
        self._notify(agent_id)

    def _notify(self, agent_id: str) -> None:
        for callback in self._watchers:
            callback(agent_id)

    def watch(self, callback: Callable[[str], None]) -> None:
        self._watchers.append(callback)

    def order_key(self, agent_id: str) -> float:
        if agent_id in self._in_flight:
            return -math.inf
        return self._keys.get(agent_id, math.inf)

    def distance(self, agent_id: str) -> float:
        if agent_id in self._in_flight:
            return 0.0
        return max(0.0, self._keys.get(agent_id, math.inf) - self.now)

    def nearest(self, k: int) -> list[str]:
        out = list(self._in_flight)[:k]
        if len(out) < k:
            taken = self._heap.smallest(k + len(out))
            seen = set(out)
            out += [e[-1] for e in taken if e[-1] not in seen][:k - len(out)]
        return out
