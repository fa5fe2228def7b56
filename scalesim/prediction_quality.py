"""How well the distance oracle predicts, measured while it runs, and which sources it trusts.

A *snapshot* is taken at an engine iteration when none is open: the ``window`` agents nearest to
calling (without a pending call), in predicted order, together with what each *source* of the
oracle (timers, deadlines, the interaction graph, turns, hints, learned call rates) estimated
for each of them and when each last called. Each agent's first call afterwards gets its
predicted rank (the trace's ``predicted_rank``). When every agent of the snapshot has called, or
four times as many calls have been made, the snapshot closes and Kendall's tau-b compares the
realised order of the calls — by sim time of each agent's first call, so calls of one instant
(which the engine batches together) tie, and agents that did not call tie for last — with:

* the oracle's combined estimate (the headline ``kendall_tau``);
* each source's own estimates, over the agents it had one for;
* the *baseline* of that source over the same agents: the order the oracle would give them
  without it — the earliest of the other sources, and among agents they tie or know nothing
  of, recency (the agent that called last calls first, which is what LRU bets on). For the
  learned call rates the baseline is the wake-up times without them.

:class:`PredictionQuality` keeps the last ``history`` measurements of every source and
*distrusts* a source whose mean tau falls more than ``margin`` below its baseline's: leaving it
out would order better. It trusts it again once it is no worse than the baseline. The oracle
leaves a distrusted source out of its estimates, so the agents it alone would have ranked are
ranked by recency (the eviction order's tie break), and a world on which the oracle mispredicts
is served like LRU rather than worse.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Any, Sequence

#: Entries of an agent's estimates that are not sources of the oracle's minimum.
NOT_SOURCES = ("recency", "wake", "learned")


class PredictionQuality:
    """Snapshots, per-source Kendall tau and trust; see the module docstring."""

    def __init__(self, window: int = 64, history: int = 8, margin: float = 0.05,
                 min_measurements: int = 3, min_agents: int = 4) -> None:
        self.window, self.history, self.margin = window, history, margin
        self.min_measurements, self.min_agents = min_measurements, min_agents
        self._snapshot: dict[str, int] | None = None
        self._combined: dict[str, float] = {}
        self._scored: list[str] = []
        self._estimates: dict[str, dict[str, float]] = {}
        self._realised: dict[str, float] = {}  # agent -> sim time of its first call
        self._snapshot_calls = 0
        self.taus: list[float] = []
        #: source -> recent (tau of the source, tau of its baseline) on the same agents
        self._recent: dict[str, deque[tuple[float, float]]] = defaultdict(
            lambda: deque(maxlen=self.history))
        self._all: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.distrusted: set[str] = set()
        self.predicted_calls = 0

    @property
    def is_open(self) -> bool:
        return self._snapshot is not None

    def due(self) -> bool:
        """Whether the open snapshot has seen enough calls to close."""
        snapshot = self._snapshot
        return snapshot is not None and (len(self._realised) >= len(snapshot)
                                         or self._snapshot_calls >= 4 * len(snapshot))

    def open(self, combined: dict[str, float], estimates: dict[str, dict[str, float]],
             scored: int | None = None) -> None:
        """Predict the agents of ``combined`` (agent -> the estimate used, in predicted order).

        ``estimates[agent]`` maps each source that had an estimate for the agent (and
        ``recency``: minus its last call time) to that estimate. Only the first ``scored``
        agents (default: all) count for the headline tau; the others are there so that the
        sources the oracle does not trust are still measured.
        """
        self._snapshot = {a: i for i, a in enumerate(combined)}
        self._combined, self._estimates = combined, estimates
        self._scored = list(combined)[:scored]
        self._realised, self._snapshot_calls = {}, 0

    def observe_call(self, agent: str, now: float) -> int | None:
        """``agent`` called at ``now``: its predicted rank, if the open snapshot predicted it."""
        if self._snapshot is None:
            return None
        self._snapshot_calls += 1
        rank = self._snapshot.get(agent)
        if rank is None or agent in self._realised:
            return None
        self._realised[agent] = now
        self.predicted_calls += 1
        return rank

    def close(self) -> set[str]:
        """Score the open snapshot; return the sources whose trust changed."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return set()
        outcome = {a: self._realised.get(a, math.inf) for a in snapshot}
        tau = kendall_tau_b([(self._combined[a], outcome[a]) for a in self._scored])
        if tau is not None:
            self.taus.append(tau)
        by_source: dict[str, list[str]] = defaultdict(list)
        for agent in snapshot:
            for source in self._estimates.get(agent, {}):
                by_source[source].append(agent)
        changed: set[str] = set()
        for source, agents in by_source.items():
            if source in ("recency", "wake") or len(agents) < self.min_agents:
                continue
            own = kendall_tau_b([(self._estimates[a][source], outcome[a]) for a in agents])
            base = kendall_tau_b([(self._without(a, source), outcome[a]) for a in agents])
            if own is None:
                continue
            measurement = (own, 0.0 if base is None else base)
            self._recent[source].append(measurement)
            self._all[source].append(measurement)
            if self._judge(source):
                changed.add(source)
        return changed

    def _without(self, agent: str, source: str) -> tuple[float, float]:
        """The order key of ``agent`` had ``source`` been left out (ties: recency)."""
        estimates = self._estimates[agent]
        recency = estimates.get("recency", math.inf)
        if source == "learned":
            return estimates.get("wake", math.inf), recency
        others = [v for k, v in estimates.items() if k not in NOT_SOURCES and k != source]
        return min(others, default=math.inf), recency

    def _judge(self, source: str) -> bool:
        recent = self._recent[source]
        if len(recent) < self.min_measurements:
            return False
        own = sum(m[0] for m in recent) / len(recent)
        base = sum(m[1] for m in recent) / len(recent)
        if source in self.distrusted:
            if own >= base:
                self.distrusted.discard(source)
                return True
        elif own < base - self.margin:
            self.distrusted.add(source)
            return True
        return False

    def trusted(self, source: str) -> bool:
        return source not in self.distrusted

    def summary(self) -> dict[str, Any]:
        """The headline tau and, per source, its mean tau, its baseline's and its trust."""
        sources = {}
        for source, measurements in sorted(self._all.items()):
            n = len(measurements)
            sources[source] = {
                "kendall_tau": round(sum(m[0] for m in measurements) / n, 4),
                "baseline": "without learned lags" if source == "learned"
                else "other sources, then recency",
                "baseline_tau": round(sum(m[1] for m in measurements) / n, 4),
                "snapshots": n, "trusted_at_end": source not in self.distrusted}
        return {
            "kendall_tau": round(sum(self.taus) / len(self.taus), 4) if self.taus else None,
            "snapshots": len(self.taus),
            "calls_with_predicted_rank": self.predicted_calls,
            "sources": sources,
        }


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def kendall_tau_b(pairs: Sequence[tuple[Any, Any]]) -> float | None:
    """Kendall's tau-b of ``(x, y)`` pairs (ties allowed; any ordered values, ``inf`` included);
    ``None`` when undefined. O(n^2)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(pairs)):
        xi, yi = pairs[i]
        for j in range(i + 1, len(pairs)):
            dx, dy = _sign(xi, pairs[j][0]), _sign(yi, pairs[j][1])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


#: fewer snapshots than this and a Kendall tau says little about the prediction's quality
RELIABLE_SNAPSHOTS = 20


def few_snapshots(distance: dict) -> str:
    """A warning to print beside a Kendall tau measured on too few snapshots ('' if enough)."""
    snapshots = distance.get("snapshots")
    if isinstance(snapshots, int) and snapshots < RELIABLE_SNAPSHOTS:
        return f"; fewer than {RELIABLE_SNAPSHOTS}: not a reliable estimate"
    return ""
