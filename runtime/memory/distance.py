"""Where distances come from: the protocol the memory manager reads, a base for sources, and a
recorded future.

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

Every source knows one thing for certain: an agent with a call queued or running calls now
(distance 0). :class:`CallTrackingSource` keeps those pending calls and the watchers, and answers
the three questions for them; a subclass adds only what it predicts about the other agents,
through three hooks (:meth:`~CallTrackingSource._predicted_key`,
:meth:`~CallTrackingSource._predicted_distance`, :meth:`~CallTrackingSource._nearest_predicted`).
Without a subclass it is the source that predicts nothing but pending calls.
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


class CallTrackingSource:
    """An :class:`OrderedDistanceSource` that knows the pending calls; subclasses predict the rest.

    A call is *pending* from :meth:`on_submit` to :meth:`on_finish` (queued or running), or to
    :meth:`on_answered` when the engine answers it ahead of its due time; an agent may have
    several. A pending agent has distance 0 and the key :attr:`PENDING_KEY`, before
    every prediction, and :meth:`nearest` lists the pending agents first, in the order they were
    submitted (the order the engine admits them), then the predicted ones. Watchers hear an agent
    whenever its key may have changed: here, when it starts or stops having a pending call; a
    subclass calls :meth:`_changed` for what it learns. A subclass whose own order already holds
    the pending calls (the oracle's heap, at the time each was made) answers :meth:`order_key`
    and :meth:`nearest` from it instead.
    """

    #: The order key of an agent with a pending call: below every predicted key.
    PENDING_KEY = -math.inf

    def __init__(self) -> None:
        #: agent -> its pending calls; the dict keeps the order of submission
        self._pending: dict[str, int] = {}
        #: agent -> its calls answered ahead of their due time, not yet handed over
        self._held: dict[str, int] = {}
        self._watchers: list[Callable[[str], None]] = []

    # -- pending calls ------------------------------------------------------------------------

    def on_submit(self, agent_id: str) -> int | None:
        """A call of ``agent_id`` was submitted: it is queued or running until it finishes.

        A source that scores its own predictions returns the rank it had given this call (the
        simulation writes it to the trace); this one predicts nothing and returns ``None``.
        """
        if self._start_call(agent_id):
            self._changed(agent_id)
        return None

    def on_answered(self, agent_id: str, due: float) -> None:
        """A call of ``agent_id`` was answered ahead of ``due`` (a call that takes simulated
        time): the engine is done with it, so it is no longer pending, though the agent
        resumes only at :meth:`on_finish`, at ``due``. Its memory is next needed for the call
        after."""
        if self._answer_early(agent_id):
            self._changed(agent_id)

    def on_finish(self, agent_id: str) -> None:
        """A call of ``agent_id`` finished (or failed): the agent has its answer."""
        if not self._hand_over(agent_id) and self._end_call(agent_id):
            self._changed(agent_id)

    def pending(self, agent_id: str) -> int:
        """How many calls of ``agent_id`` are queued or running."""
        return self._pending.get(agent_id, 0)

    def _start_call(self, agent_id: str) -> bool:
        """Count a submitted call; ``True`` if the agent had none pending (its key changed)."""
        pending = self._pending
        calls = pending.get(agent_id, 0)
        pending[agent_id] = calls + 1
        return not calls

    def _answer_early(self, agent_id: str) -> bool:
        """Count a call answered ahead of its due time as held, and end it; ``True`` if it was
        the agent's last pending one."""
        self._held[agent_id] = self._held.get(agent_id, 0) + 1
        return self._end_call(agent_id)

    def _hand_over(self, agent_id: str) -> bool:
        """Count a held answer handed over; ``True`` if ``agent_id`` had one (its call has
        already stopped being pending)."""
        held = self._held.get(agent_id, 0)
        if not held:
            return False
        if held == 1:
            del self._held[agent_id]
        else:
            self._held[agent_id] = held - 1
        return True

    def _end_call(self, agent_id: str) -> bool:
        """Count a finished call; ``True`` if it was the agent's last pending one."""
        pending = self._pending
        calls = pending.get(agent_id, 0)
        if calls > 1:
            pending[agent_id] = calls - 1
            return False
        if not calls:
            return False  # not ours (e.g. submitted before this source was attached)
        # Leave the dict, so that its order stays the order of submission (first come, first
        # served): an agent that calls again queues behind those already waiting.
        del pending[agent_id]
        return True

    # -- watchers -----------------------------------------------------------------------------

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent_id)`` whenever that agent's :meth:`order_key` may change."""
        self._watchers.append(callback)

    def _changed(self, agent_id: str) -> None:
        for callback in self._watchers:
            callback(agent_id)

    # -- the distance protocol ----------------------------------------------------------------

    def distance(self, agent_id: str) -> float:
        """How soon ``agent_id`` calls: 0 with a pending call, else the prediction."""
        if agent_id in self._pending:
            return 0.0
        return self._predicted_distance(agent_id)

    def order_key(self, agent_id: str) -> float:
        """:attr:`PENDING_KEY` with a pending call, else the predicted key."""
        if agent_id in self._pending:
            return self.PENDING_KEY
        return self._predicted_key(agent_id)

    def nearest(self, k: int) -> list[str]:
        """The pending agents in order of submission, then the nearest predicted ones."""
        out = list(itertools.islice(self._pending, k))
        if len(out) < k:
            out += self._nearest_predicted(k - len(out))
        return out

    # -- what a subclass predicts about agents without a pending call -------------------------

    def _predicted_key(self, agent_id: str) -> float:
        """The order key of ``agent_id``, which has no pending call (``inf``: unknown)."""
        return math.inf

    def _predicted_distance(self, agent_id: str) -> float:
        """The distance of ``agent_id``, which has no pending call (``inf``: unknown)."""
        return math.inf

    def _nearest_predicted(self, k: int) -> list[str]:
        """Up to ``k`` agents without a pending call, nearest first."""
        return []


class FutureSequence(CallTrackingSource):
    """Exact distances from the recorded order of calls (``agents[i]`` made the i-th call).

    :meth:`on_submit` advances the cursor; the distance of an agent is the number of calls
    between the cursor and the agent's next recorded call. When the live run diverges from the
    recording (an agent calls out of turn), the cursor follows the live run: that agent's next
    recorded occurrence is consumed.
    """

    #: before every recorded position (they count from 0)
    PENDING_KEY = -1.0

    def __init__(self, agents: Iterable[str]) -> None:
        super().__init__()
        self.sequence = list(agents)
        self._positions: dict[str, deque[int]] = defaultdict(deque)
        for i, agent in enumerate(self.sequence):
            self._positions[agent].append(i)
        self.cursor = 0

    def on_submit(self, agent_id: str) -> None:
        positions = self._positions.get(agent_id)
        old = self.cursor
        if positions:
            self.cursor = max(self.cursor, positions.popleft() + 1)
        super().on_submit(agent_id)
        if self._watchers:
            # Agents whose next recorded call the cursor just passed now have a later one.
            # dict.fromkeys keeps the recorded order (a set's would change per process)
            for agent in dict.fromkeys(self.sequence[old:self.cursor]):
                if agent == agent_id:
                    continue
                self._changed(agent)

    def _predicted_key(self, agent_id: str) -> float:
        """The position of the agent's next recorded call."""
        return float(self._next(agent_id) + self.cursor)

    def _predicted_distance(self, agent_id: str) -> float:
        return float(self._next(agent_id))

    def _next(self, agent_id: str) -> float:
        positions = self._positions.get(agent_id)
        while positions and positions[0] < self.cursor:
            positions.popleft()  # the live run skipped past it
        return positions[0] - self.cursor if positions else math.inf

    def _nearest_predicted(self, k: int) -> list[str]:
        out: list[str] = []
        seen = set(self._pending)
        for i in range(self.cursor, len(self.sequence)):
            if len(out) >= k:
                break
            agent = self.sequence[i]
            if agent not in seen:
                seen.add(agent)
                out.append(agent)
        return out
