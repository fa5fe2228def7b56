"""Invocation distance: which agent calls the LLM next, read off the simulation itself.

:class:`DistanceOracle` keeps, for every agent, an estimated sim time of its next LLM call and
serves the memory manager's :class:`runtime.memory.DistanceSource` questions (``distance``,
``nearest``). The estimate is the minimum over what the simulation knows:

* a **pending or running call**: now (distance 0);
* a **timer** (``Agent.wait``): the wake-up time already in the simpy event queue — exact;
* a **receive** (``Agent.receive``) or **bounded wait** (``Agent.wait_for``): the earlier of its
  timeout, an upper bound, and the estimate of its in-neighbours on the world's interaction graph
  plus ``edge_delay`` (they must speak first); changes propagate along out-edges for
  ``propagation_depth`` hops;
* a **turn order** (:mod:`scalesim.turns`): the current speaker first (at its own estimate, or
  now), then each other member ``turn_delay`` after the one before it;
* a **hint** (``World.hint(agent, eta)``): what only the world author knows.

An agent blocked on a timer is estimated by its timer (and a hint) alone, since its wake-up time
is exact. The agents are ordered by that estimate in a :class:`~runtime.memory.lazy_heap.LazyHeap`
(the memory manager's eviction index uses the same), so a timer-driven world costs O(log n) per
event and :meth:`DistanceOracle.nearest` O(k log n); nothing re-sorts all agents.

Prediction quality is measured with *snapshots*: at an engine iteration with no open snapshot, the
``window`` nearest agents without a pending call are recorded in predicted order; each agent's
first call afterwards gets its predicted rank (the trace's ``predicted_rank``) and the realised
order of those calls is compared with the prediction by Kendall's tau when the snapshot closes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from runtime.memory.lazy_heap import LazyHeap

if TYPE_CHECKING:
    from scalesim.environment import SimEnvironment


class DistanceOracle:
    """Estimated next-call times of every agent; implements ``runtime.memory.DistanceSource``."""

    def __init__(self, env: SimEnvironment, graph: Any = None, *, edge_delay: float = 0.0,
                 propagation_depth: int = 2, turn_delay: float = 1e-6, window: int = 64) -> None:
        self.env = env
        self.graph = graph
        self.edge_delay = edge_delay
        self.propagation_depth = propagation_depth
        self.turn_delay = turn_delay
        self.window = window
        self._pending: dict[str, float] = {}
        self._timer: dict[str, float] = {}
        self._receive: dict[str, float] = {}  # agent -> timeout deadline (inf: none)
        self._via_graph: dict[str, float] = {}
        self._graph_root: dict[str, str] = {}  # agent -> whose own estimate its graph one is
        self._hint: dict[str, float] = {}
        self._turn: dict[str, float] = {}
        self._eta: dict[str, float] = {}
        self._heap: LazyHeap[str] = LazyHeap()
        self._watchers: list[Callable[[str], None]] = []
        # prediction-quality snapshots
        self._snapshot: dict[str, int] | None = None
        self._realised: list[str] = []
        self._snapshot_calls = 0
        self.taus: list[float] = []
        self.predicted_calls = 0
        self.calls = 0

    # -- hooks: what agents and the environment report ----------------------------------------

    def on_submit(self, agent: str) -> int | None:
        """``agent`` issued a call now; returns its predicted rank, if a snapshot predicted it."""
        self.calls += 1
        rank = self._observe_call(agent)
        self._pending[agent] = self.env.now
        self._hint.pop(agent, None)
        self._clear_blocking(agent)
        self._update(agent)
        return rank

    def on_finish(self, agent: str) -> None:
        """``agent``'s call returned; until it blocks again it counts as about to act."""
        self._pending.pop(agent, None)
        self._update(agent)

    def on_wait(self, agent: str, until: float) -> None:
        """``agent`` sleeps until exactly ``until``."""
        self._clear_blocking(agent)
        self._pending.pop(agent, None)
        self._timer[agent] = until
        self._update(agent)

    def on_receive(self, agent: str, deadline: float = math.inf) -> None:
        """``agent`` blocks until something happens, at the latest at ``deadline``."""
        self._clear_blocking(agent)
        self._pending.pop(agent, None)
        self._receive[agent] = deadline
        self._set_via_graph(agent)
        self._update(agent)

    def on_exit(self, agent: str) -> None:
        for table in (self._pending, self._timer, self._receive, self._via_graph,
                      self._graph_root, self._hint, self._turn):
            table.pop(agent, None)
        self._update(agent)

    def hint(self, agent: str, eta: float) -> None:
        """The world says ``agent`` will call at about sim time ``eta`` (absolute)."""
        self._hint[agent] = eta
        self._update(agent)

    def use_graph(self, graph: Any) -> None:
        """Estimate receive-blocked agents from their in-neighbours on ``graph``."""
        self.graph = graph

    def _clear_blocking(self, agent: str) -> None:
        self._timer.pop(agent, None)
        self._receive.pop(agent, None)
        self._via_graph.pop(agent, None)
        self._graph_root.pop(agent, None)

    # -- the estimate -------------------------------------------------------------------------

    def eta(self, agent: str) -> float:
        """Estimated sim time of ``agent``'s next call (``inf``: unknown)."""
        return self._eta.get(agent, math.inf)

    def order_key(self, agent: str) -> float:
        """The estimated call time: orders agents as :meth:`distance` does, without drifting."""
        return self._eta.get(agent, math.inf)

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent)`` whenever an agent's estimate changes (the memory manager)."""
        self._watchers.append(callback)

    def distance(self, agent_id: str) -> float:
        if agent_id in self._pending:
            return 0.0
        return max(0.0, self.eta(agent_id) - self.env.now)

    def nearest(self, k: int) -> list[str]:
        """The ``k`` agents with the smallest estimate, nearest first: O(k log n)."""
        self._refresh_turns()
        return [entry[-1] for entry in self._heap.smallest(k)]

    def _combined(self, agent: str, with_turn: bool = True) -> float:
        if agent in self._pending:
            return self._pending[agent]
        hint = self._hint.get(agent, math.inf)
        if agent in self._timer:  # blocked on a timer: its wake-up time is exact
            return min(self._timer[agent], hint)
        candidates = [hint, self._turn.get(agent, math.inf) if with_turn else math.inf]
        if agent in self._receive:
            candidates += [self._receive[agent], self._via_graph.get(agent, math.inf)]
        return min(candidates)

    def _update(self, agent: str, depth: int | None = None) -> None:
        eta = self._combined(agent)
        versions = self._heap.versions
        if self._eta.get(agent) == eta and agent in versions:
            return
        if math.isinf(eta):
            self._eta.pop(agent, None)
            versions.drop(agent)
        else:
            self._eta[agent] = eta
            self._heap.push((eta, versions.stamp(agent), agent))
        for callback in self._watchers:
            callback(agent)
        self._propagate(agent, self.propagation_depth if depth is None else depth)

    def _root(self, agent: str) -> str:
        """Whose own (not graph-derived) estimate ``agent``'s current estimate is."""
        if agent in self._via_graph and self._eta.get(agent) == self._via_graph[agent]:
            return self._graph_root.get(agent, agent)
        return agent

    def _set_via_graph(self, agent: str) -> bool:
        """Re-estimate ``agent`` from its in-neighbours; ``True`` if the estimate changed.

        A neighbour's estimate that was itself derived from ``agent``, or from an agent whose own
        estimate has since moved later, is skipped: on a cycle (two villagers who messaged each
        other) or beyond ``propagation_depth`` hops, old estimates would otherwise stay alive
        long after they passed, as "about to call" forever.
        """
        best, root = math.inf, agent
        if self.graph is not None and agent in self.graph:
            for u in self.graph.predecessors(agent):
                eta = self._eta.get(u, math.inf)
                if eta + self.edge_delay >= best:
                    continue
                source = self._root(u)
                if source == agent or (source != u and self._eta.get(source, math.inf) > eta):
                    continue
                best, root = eta + self.edge_delay, source
        changed = best != self._via_graph.get(agent)
        self._via_graph[agent], self._graph_root[agent] = best, root
        return changed

    def _propagate(self, agent: str, depth: int) -> None:
        """Re-estimate receive-blocked out-neighbours of ``agent`` (bounded number of hops)."""
        if depth <= 0 or self.graph is None or agent not in self.graph:
            return
        for v in self.graph.successors(agent):
            if v in self._receive and v not in self._pending:
                if self._set_via_graph(v):
                    self._update(v, depth - 1)

    def _refresh_turns(self) -> None:
        orders = self.env.open_turn_orders()
        if not orders and not self._turn:
            return
        fresh: dict[str, float] = {}
        for order in orders:
            # Each member speaks turn_delay after the one before it has (or will have) spoken.
            previous = None
            for member in order.upcoming():
                guess = self.env.now if previous is None else previous + self.turn_delay
                fresh[member] = min(guess, fresh.get(member, math.inf))
                own = self._combined(member, with_turn=False)
                exact = member in self._pending or member in self._timer
                previous = own if exact else min(own, guess)
        stale = set(self._turn) - set(fresh)
        for member in stale:
            del self._turn[member]
            self._update(member)
        for member, eta in fresh.items():
            if self._turn.get(member) != eta:
                self._turn[member] = eta
                self._update(member)

    # -- prediction quality -------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Called before each engine iteration: refresh turns; open a snapshot if none is open."""
        # Turn positions change without a hook (a member speaks, an order closes); without this
        # an agent whose conversation ended stays "next to speak" until the next prefetch pass.
        self._refresh_turns()
        if self._snapshot is not None:
            if (len(self._realised) < len(self._snapshot)
                    and self._snapshot_calls < 4 * len(self._snapshot)):
                return
            self._close_snapshot()
        order = [a for a in self.nearest(self.window + len(self._pending))
                 if a not in self._pending][:self.window]
        if len(order) >= 2:
            self._snapshot = {a: i for i, a in enumerate(order)}
            self._realised, self._snapshot_calls = [], 0

    def _observe_call(self, agent: str) -> int | None:
        if self._snapshot is None:
            return None
        self._snapshot_calls += 1
        rank = self._snapshot.get(agent)
        if rank is None or agent in self._realised:
            return None
        self._realised.append(agent)
        self.predicted_calls += 1
        return rank

    def _close_snapshot(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        realised = {a: i for i, a in enumerate(self._realised)}
        # agents that never called during the snapshot tie for last place
        pairs = [(rank, realised.get(a, len(snapshot))) for a, rank in snapshot.items()]
        tau = kendall_tau_b(pairs)
        if tau is not None:
            self.taus.append(tau)

    def quality(self) -> dict[str, Any]:
        """Prediction quality for ``summary.json``."""
        self._close_snapshot()
        return {
            "kendall_tau": round(sum(self.taus) / len(self.taus), 4) if self.taus else None,
            "snapshots": len(self.taus),
            "calls_with_predicted_rank": self.predicted_calls,
            "calls": self.calls,
        }


def kendall_tau_b(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Kendall's tau-b of ``(x, y)`` pairs (ties allowed); ``None`` when undefined. O(n^2)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(pairs)):
        xi, yi = pairs[i]
        for j in range(i + 1, len(pairs)):
            dx, dy = xi - pairs[j][0], yi - pairs[j][1]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None
