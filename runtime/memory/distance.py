"""Where distances come from: the protocol the memory manager reads, and a recorded future.

The *invocation distance* of an agent is how soon it will issue its next LLM request. The runtime
never computes it; a :class:`DistanceSource` supplies it. ``scalesim.distance.DistanceOracle``
derives it from the simulation's event queue; :class:`FutureSequence` reads it off the recorded
invocation sequence of an earlier run of the same seed, which is what the offline-optimal
``belady`` policy needs.

Distances are only compared, never added to wall time: any monotone scale works (sim time until
the call, or the number of calls until it).

A source may also be an :class:`OrderedDistanceSource`, offering ``order_key(agent_id)`` and
``watch(callback)``: a key that orders agents
as their distances do but does not drift as time passes (the estimated *time* of the next call
rather than the time *until* it), and a callback for every agent whose key changed. The memory
manager then keeps its eviction index current at O(log n) per change instead of re-sorting all
resident objects at each eviction. A key must be consistent with :meth:`distance`: ``order_key(a)
< order_key(b)`` implies ``distance(a) <= distance(b)`` at any moment.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict, deque
from typing import Callable, Iterable, Protocol, runtime_checkable


@runtime_checkable
class DistanceSource(Protocol):
    """What the memory manager asks about agents."""

    def distance(self, agent_id: str) -> float:
        """How soon ``agent_id`` calls the LLM: 0 for a pending call, ``inf`` when unknown."""

    def nearest(self, k: int) -> list[str]:
        """The ``k`` agents expected to call soonest, nearest first (pending calls included)."""


@runtime_checkable
class OrderedDistanceSource(DistanceSource, Protocol):
    """A source whose order can be watched: the memory manager then keeps its index current."""

    def order_key(self, agent_id: str) -> float:
        """A time-invariant key that orders agents as :meth:`distance` does."""

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent_id)`` whenever that agent's :meth:`order_key` may change."""


class FutureSequence:
    """Exact distances from the recorded order of calls (``agents[i]`` made the i-th call).

    :meth:`on_submit` advances the cursor; the distance of an agent is the number of calls
    between the cursor and the agent's next recorded call. When the live run diverges from the
    recording (an agent calls out of turn), the cursor follows the live run: that agent's next
    recorded occurrence is consumed.
    """

    def __init__(self, agents: Iterable[str]) -> None:
        self.sequence = list(agents)
        self._positions: dict[str, deque[int]] = defaultdict(deque)
        for i, agent in enumerate(self.sequence):
            self._positions[agent].append(i)
        self.cursor = 0
        self._pending: dict[str, int] = defaultdict(int)
        self._watchers: list[Callable[[str], None]] = []

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent)`` whenever ``order_key(agent)`` may have changed."""
        self._watchers.append(callback)

    def _changed(self, agent_id: str) -> None:
        for callback in self._watchers:
            callback(agent_id)

    def on_submit(self, agent_id: str) -> None:
        positions = self._positions.get(agent_id)
        old = self.cursor
        if positions:
            self.cursor = max(self.cursor, positions.popleft() + 1)
        self._pending[agent_id] += 1
        self._changed(agent_id)
        if self._watchers:
            # Agents whose next recorded call the cursor just passed now have a later one.
            for agent in set(self.sequence[old:self.cursor]) - {agent_id}:
                self._changed(agent)

    def on_finish(self, agent_id: str) -> None:
        if self._pending.get(agent_id):
            self._pending[agent_id] -= 1
            if not self._pending[agent_id]:
                # Leave the dict, so that its order stays the order of submission (FIFO
                # admission): nearest() lists waiting agents in the order they will run.
                del self._pending[agent_id]
            self._changed(agent_id)

    def order_key(self, agent_id: str) -> float:
        """The position of the agent's next recorded call (-1 while a call is pending)."""
        if self._pending.get(agent_id):
            return -1.0
        return float(self._next(agent_id) + self.cursor)

    def _next(self, agent_id: str) -> float:
        positions = self._positions.get(agent_id)
        while positions and positions[0] < self.cursor:
            positions.popleft()  # the live run skipped past it
        return positions[0] - self.cursor if positions else math.inf

    def distance(self, agent_id: str) -> float:
        if self._pending.get(agent_id):
            return 0.0
        return float(self._next(agent_id))

    def nearest(self, k: int) -> list[str]:
        out = list(itertools.islice(self._pending, k))  # in order of submission
        seen = set(out)
        for i in range(self.cursor, len(self.sequence)):
            if len(out) >= k:
                break
            agent = self.sequence[i]
            if agent not in seen:
                seen.add(agent)
                out.append(agent)
        return out
