"""Invocation distances for the server's memory manager, from what clients tell it.

:class:`HintedDistance` implements the runtime's
:class:`~runtime.memory.distance.OrderedDistanceSource`, as the in-process
``scalesim.distance.DistanceOracle`` does, so every memory policy works unchanged. Its order key
of an agent is the estimated *server* time (seconds since the server started) of the agent's
next call:

* a call queued or running: ``-1`` (distance 0), nearest first in order of submission (kept by
  :class:`~runtime.memory.distance.CallTrackingSource`);
* a hint: a session reports its own ``clock`` and an absolute ``eta`` on it; the hint lands at
  ``now + (eta - clock)``, one unit of a session's clock read as one second. ``"never"`` (the
  agent is done) orders after everything, so its objects are evicted first; ``None`` drops the
  hint. The seed paper's ``/v1/update`` distances are hints with ``eta - clock = distance``;
* nothing known: after every hinted agent (distance ``inf``), where the manager's recency tie
  break orders agents as LRU would.

A hint whose moment passed without the agent calling is stale and is dropped at the next
:meth:`HintedDistance.expire` (the engine loop calls it every iteration), never read as
distance 0. Bulk hints carry a ``seq`` per session that only increases; an older or repeated
one is ignored. Hints are best-effort: nothing here raises because of a client's hint.
"""

from __future__ import annotations

import heapq
import math
import time
from typing import Callable, Iterable

from runtime.memory.distance import CallTrackingSource
from scalesim.serve.protocol import AgentHint, Eta

#: The order key of an agent about which nothing is known: after every hint, before "never".
UNKNOWN = 1e300


class HintedDistance(CallTrackingSource):
    """A watchable distance source fed by client hints (see the module docstring)."""

    #: before every hint (a hint's key is a server time, never negative)
    PENDING_KEY = -1.0

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        start = time.monotonic()
        self._now = clock or (lambda: time.monotonic() - start)
        self._hinted: dict[str, float] = {}  # agent -> order key of its hint
        self._kinds: dict[str, str] = {}
        self._expiry: list[tuple[float, str]] = []  # (key, agent), lazily deleted
        self._seq: dict[str, int] = {}
        #: hints applied, dropped as stale (seq), and expired, for /metrics
        self.applied = self.stale = self.expired = 0

    # -- what the hints predict ---------------------------------------------------------------

    def _predicted_key(self, agent_id: str) -> float:
        return self._hinted.get(agent_id, UNKNOWN)

    def _predicted_distance(self, agent_id: str) -> float:
        key = self._hinted.get(agent_id, UNKNOWN)
        if key >= UNKNOWN:
            return math.inf
        return max(0.0, key - self._now())

    def _nearest_predicted(self, k: int) -> list[str]:
        now, pending = self._now(), self._pending
        ahead = ((key, agent) for agent, key in self._hinted.items()
                 if now <= key < UNKNOWN and agent not in pending)
        return [agent for _, agent in heapq.nsmallest(k, ahead)]

    # -- what the engine loop reports ---------------------------------------------------------

    def expire(self) -> int:
        """Drop hints whose moment has passed without a call; how many were dropped."""
        now, dropped = self._now(), 0
        while self._expiry and self._expiry[0][0] < now:
            key, agent = heapq.heappop(self._expiry)
            if self._hinted.get(agent) == key:
                del self._hinted[agent]
                self._kinds.pop(agent, None)
                dropped += 1
                self._changed(agent)
        self.expired += dropped
        return dropped

    # -- what clients send --------------------------------------------------------------------

    def hint(self, agent: str, eta: Eta, clock: float | None = None,
             kind: str = "estimate") -> None:
        """Set (or with ``eta=None`` drop) ``agent``'s hint; ``clock`` is the session's now."""
        if eta is None:
            if self._hinted.pop(agent, None) is not None:
                self._kinds.pop(agent, None)
                self._changed(agent)
            return
        if eta == "never":
            key = math.inf
        else:
            try:
                ahead = float(eta) - (float(clock) if clock is not None else 0.0)
            except (TypeError, ValueError):
                return
            if math.isnan(ahead):
                return
            key = self._now() + max(0.0, ahead)
            if not math.isinf(key):
                heapq.heappush(self._expiry, (key, agent))
        self._hinted[agent] = key
        self._kinds[agent] = kind
        self.applied += 1
        self._changed(agent)

    def bulk(self, session: str, clock: float, seq: int, hints: Iterable[AgentHint]) -> bool:
        """Apply a session's batch of hints unless ``seq`` is not newer than the last one."""
        if seq <= self._seq.get(session, -math.inf):
            self.stale += 1
            return False
        self._seq[session] = seq
        for item in hints:
            self.hint(item.agent, item.eta, clock)
        return True

    def kind_of(self, agent: str) -> str | None:
        return self._kinds.get(agent)

    @property
    def hinted(self) -> int:
        return len(self._hinted)
