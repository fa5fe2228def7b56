"""Invocation distances learned from the request stream, for clients that send no hints.

A server sees, of an unmodified simulator, only when each agent's requests arrive and finish.
:class:`StreamEstimator` predicts from that alone when each agent calls next, and is an
:class:`~runtime.memory.distance.OrderedDistanceSource` like the in-process oracle, so the
``scalesim`` policy evicts the agents predicted farthest and prefetches the nearest.

What it models, and why
-----------------------
The unit is the *arrival*: an agent's next call is predicted as an arrival index (how many
requests come before it), the scale on which a simulator's order is stable (a round's wall time
grows with the load, its number of requests does not). Simulators drive their agents in a few
recurring shapes, and each leaves a mark on the stream; each is a *signal*:

* **lockstep rounds** (OASIS, AgentScope's pipelines, most "step" loops): every active agent
  calls once per round, in much the same order each round, and between rounds the client does
  its own work while nothing is pending. A *round boundary* is an arrival that finds nothing
  pending after an idle gap ``gap_factor`` times longer than the usual gap between arrivals
  while calls are pending (of a client that only ever has one call pending: than its usual
  pause). Rounds are *lockstep* once most of a round's agents (an average share of 0.6) also
  called in the round before. Then an agent whose first call of this round was at position
  ``p`` is predicted at position ``p`` of the next round, taken to be as long as the last
  complete one (signal ``round``).
* **an agent's own cycle** (the fallback, always available after two calls): the arrivals from
  one of its calls to the next repeat in a pattern; the next cycle is the one that followed a
  cycle of the same order of magnitude last time, else the last one (signal ``cycle``). Under
  round-robin turn-taking this is exactly the previous position plus the round length, with or
  without idle gaps.
* **chained calls** of one agent (a tool call answered, then the request with its result; a
  reflection right after an observation): a cycle of one or two arrivals, predicted when the
  pattern says one follows (signal ``chain``); the pattern also knows that a long wait follows.
* **successors** (conversations, turn-taking: A's reply triggers B's call): the first arrival
  after A's call finished, if nothing arrived in between, is A's successor; when one agent has
  been it at least twice and in at least half of A's finishes, it is predicted as the very next
  arrival whenever A finishes (signal ``successor``).

Every prediction is scored when its agent calls: a hit if the call came within half the
prediction's horizon (or two arrivals) of where it was predicted. A signal whose average score
falls more than :data:`TRUST_MARGIN` below the cycle's is set aside (its agents get their cycle
prediction) and kept being scored, so that it can come back. Prefetching is a bet, so
:meth:`nearest` offers only agents whose last call was a hit; eviction ranks every prediction.
An agent late by more than ``late_cycles`` of its cycles (half a round under lockstep) is
pushed on by one cycle, twice as far each time it stays away: a late agent is not read as
distance 0 for ever, yet a late irregular agent, which tends to call before those that called
since, is not moved back at once. Agents never predicted (one call so far) are unknown, after
every prediction, where the manager's tie break orders them by recency (as ``lru``).

Order keys are arrival indices; distances are seconds, ``(predicted arrival - last arrival)``
times the long-run seconds per arrival (:meth:`StreamEstimator.time_of`), so they order as the
keys do. :class:`~scalesim.serve.hints_or_estimate.HintsOrEstimate` maps a client's hint (a
server time) onto the same arrival scale, and a hint wins over the estimate for its agent.

Cost: each arrival and each finish updates one or two agents, and each update is a push on a
:class:`~runtime.memory.lazy_heap.LazyHeap` (lazily invalidated), so O(log n) per request; a
round boundary looks once at each agent of the round that ended (O(1) per arrival, amortized);
a push-on doubles each time, so a departed agent costs O(log) of them; :meth:`nearest` looks at
most ``4k`` entries deep, O(k log n). Nothing depends on hash order or randomness: the same stream of
(arrival, finish, clock) events gives the same keys.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from runtime.memory.distance import CallTrackingSource
from runtime.memory.lazy_heap import LazyHeap

#: The order key of an agent about which nothing is known (same as the hints' ``UNKNOWN``).
UNKNOWN = 1e300


@dataclass(slots=True)
class _Agent:
    """What the stream has shown of one agent."""

    last_call: int = -1       # arrival index of its last call
    cycle: int = 0            # arrivals from its call before that one to its last call
    after: dict[int, int] = field(default_factory=dict)  # cycle class -> the cycle after it
    visit_round: int = -1     # the round of its first call in a round
    position: int = 0         # arrivals of that round before that call
    misses: int = 0           # predictions that passed without a call, in a row
    expect_at: int = -1       # the arrival index its next call was predicted at (-1: none)
    expect_from: int = 0      # ... predicted when this many arrivals had been seen
    expert: str = ""          # ... by which signal
    hit: bool = False         # whether its last call came where it was predicted
    successors: Counter[str] = field(default_factory=Counter)
    successor: str | None = None  # the most frequent of them (the first to reach its count)
    finishes: int = 0


#: The signals, each scored by how often the agent called near where it said (within half the
#: horizon, or two arrivals). The agent's own cycle is the fallback; another signal whose
#: average falls :data:`TRUST_MARGIN` below the cycle's is not used (still scored, so that it
#: can recover).
SIGNALS = ("chain", "round", "cycle", "successor")
TRUST_ALPHA, TRUST_MARGIN = 0.05, 0.1


def cycle_class(cycle: int) -> int:
    """Cycles of one order of magnitude (powers of two) share a class; 1 (a call right after
    the agent's own) is its own."""
    return cycle.bit_length()


class StreamEstimator(CallTrackingSource):
    """Next-call predictions from arrivals and finishes alone (see the module docstring).

    ``clock`` is the server's time in seconds (default: monotonic seconds since creation).
    ``gap_factor`` is how much longer than the usual gap between arrivals (while calls are
    pending) an idle gap must be to end a round (see :meth:`_round_boundary`);
    ``late_cycles`` how many of its cycles an agent may be late before its prediction is pushed
    on (outside lockstep rounds). ``alpha`` is the weight of the newest sample in the
    exponential averages of rounds and gaps.
    """

    #: before every prediction (a prediction's key is an arrival index, never negative)
    PENDING_KEY = -1.0

    def __init__(self, clock: Callable[[], float] | None = None, *, gap_factor: float = 4.0,
                 alpha: float = 0.3, late_cycles: float = 4.0) -> None:
        super().__init__()
        start = time.monotonic()
        self._now = clock or (lambda: time.monotonic() - start)
        self.gap_factor, self.alpha, self.late_cycles = gap_factor, alpha, late_cycles
        self._agents: dict[str, _Agent] = {}
        self._key: dict[str, float] = {}
        self._period_of: dict[str, float] = {}  # the arrivals a pushed-on prediction moves by
        self._heap: LazyHeap[str] = LazyHeap()
        #: arrivals so far; the long-run seconds per arrival; the first and last arrival times
        self.arrivals = 0
        self._spa = 0.0
        self._first_arrival_t: float | None = None
        self._last_arrival_t: float | None = None
        self._last_finish_t: float | None = None
        self._last_finished: str | None = None  # the agent of the last finish, if nothing
        #                                          arrived since (a successor's predecessor)
        #: rounds: how many boundaries were seen, where the current round began (arrival
        #: index) and how long the last complete one was (arrivals)
        self.rounds = 0
        self._round_start = 0
        self._round_length = 0
        self._visited: set[str] = set()  # agents that visited in the current round
        self._previous: set[str] = set()  # ... and in the round before
        self._recur = -1.0  # average share of a round's agents seen in the round before (-1: none)
        self._busy_gap, self._busy_n = 0.0, 0  # gaps between arrivals while calls are pending
        self._calm_idle, self._calm_n = 0.0, 0  # idle gaps that did not end a round
        #: predictions made (for /metrics)
        self.predictions = 0
        #: each signal's average score (see :data:`SIGNALS`)
        self.trust: dict[str, float] = dict.fromkeys(SIGNALS, 1.0)

    # -- what the stream shows ----------------------------------------------------------------

    def on_submit(self, agent_id: str) -> None:
        """A request of ``agent_id`` arrived."""
        now, n = self._now(), self.arrivals
        self._round_boundary(now)
        if self._first_arrival_t is None:
            self._first_arrival_t = now
        elif n:  # the long-run seconds per arrival: keys stay (nearly) an affine map of arrivals
            self._spa = max(0.0, now - self._first_arrival_t) / n
        self._last_arrival_t = now
        a = self._agents.get(agent_id)
        if a is None:
            a = self._agents[agent_id] = _Agent()
        # A successor: the first arrival after another agent's finish, nothing in between.
        pred = self._last_finished
        if pred is not None and pred != agent_id:
            p = self._agents[pred]
            p.successors[agent_id] += 1
            if p.successor is None or p.successors[agent_id] > p.successors[p.successor]:
                p.successor = agent_id  # kept as counts grow: O(1), not a scan
        self._last_finished = None
        if agent_id not in self._visited:  # its first call of this round: its position
            self._visited.add(agent_id)
            a.visit_round, a.position = self.rounds, n - self._round_start
        if a.last_call >= 0:  # arrivals since its own last call: learn the pattern
            cycle = n - a.last_call
            if a.cycle:
                a.after[cycle_class(a.cycle)] = cycle
            a.cycle = cycle
        if a.expect_at >= 0:  # score the signal that predicted this call
            hit = abs(n - a.expect_at) <= max(2.0, 0.5 * (a.expect_at - a.expect_from))
            self.trust[a.expert] += TRUST_ALPHA * (hit - self.trust[a.expert])
            a.expect_at, a.hit = -1, hit
        a.last_call, a.misses = n, 0
        self.arrivals = n + 1
        self._heap.versions.drop(agent_id)  # it calls now: its prediction is spent
        self._key.pop(agent_id, None)
        super().on_submit(agent_id)
        return None

    def on_finish(self, agent_id: str) -> None:
        """A request of ``agent_id`` finished (or failed)."""
        now = self._now()
        self._last_finish_t = now
        a = self._agents.get(agent_id)
        if a is None or not self._end_call(agent_id):
            return  # not ours, or it has more calls pending (distance still 0)
        a.finishes += 1
        self._last_finished = agent_id
        self._expect(agent_id, a, *self._ahead(a))
        # Its usual successor is expected next (if that signal has been right).
        successor = self._successor(a)
        if successor is not None and successor not in self._pending:
            b = self._agents[successor]
            if self._trusted("successor"):
                self._expect(successor, b, 1.0, "successor", 1.0)
                self._changed(successor)
            else:  # scored all the same, so that it can earn trust
                b.expect_at, b.expect_from, b.expert = self.arrivals, self.arrivals, "successor"
        self._changed(agent_id)

    def _trusted(self, signal: str) -> bool:
        """The cycle is the fallback; another signal is used while it scores about as well."""
        trust = self.trust
        return signal == "cycle" or trust[signal] >= trust["cycle"] - TRUST_MARGIN

    def _expect(self, agent: str, a: _Agent, ahead: float, signal: str,
                fallback: float) -> None:
        """Note the prediction (to score ``signal`` when the agent calls) and publish it as the
        agent's key if ``signal`` is trusted, else the ``fallback`` (its cycle's)."""
        if math.isinf(ahead):
            a.expect_at = -1
            self._predict(agent, a, ahead)
            return
        a.expect_at, a.expect_from, a.expert = self.arrivals + int(ahead) - 1, self.arrivals, \
            signal
        self._predict(agent, a, ahead if self._trusted(signal) else fallback)

    def expire(self) -> int:
        """Push on the predictions whose moment passed without a call; how many were."""
        now, heap, moved = self._now(), self._heap, 0
        while True:
            entry = heap.pop()
            if entry is None:
                break
            key, _, agent = entry
            a = self._agents[agent]
            period = self._period_of.get(agent, 1.0)
            # Late by more than its slack (in arrivals): pushed on. Lockstep rounds are exact,
            # so half a round is late there; elsewhere ``late_cycles`` of its cycles (an
            # irregular agent that is late still tends to come before those that called since:
            # pushing it early cost more than it saved on the replayed worlds).
            slack = (0.5 if self.lockstep else self.late_cycles) * period
            late = self.arrivals - key
            if late <= max(2.0, slack) or key >= UNKNOWN:
                heap.restore([entry])
                break
            a.misses += 1  # late: the next cycle, then twice as far each time it misses
            self._predict(agent, a, period * 2 ** min(a.misses - 1, 30))
            moved += 1
            self._changed(agent)
        return moved

    # -- predictions --------------------------------------------------------------------------

    def _round_boundary(self, now: float) -> None:
        """Start a new round if this arrival finds nothing pending after an idle gap at least
        ``gap_factor`` times the usual gap between arrivals while calls are pending (a client
        that sends a round's requests together and waits for them all), or, of a client that
        never had two calls pending, than its usual pause between calls. With no gaps at all
        (a replay on a modeled clock) every arrival that finds nothing pending starts one."""
        last = self._last_arrival_t
        if self._pending:
            if last is not None:
                gap = max(0.0, now - last)
                self._busy_gap = gap if self._busy_n == 0 else \
                    self._busy_gap + self.alpha * (gap - self._busy_gap)
                self._busy_n += 1
            return
        if self._last_finish_t is None or self.arrivals == 0:
            return
        idle = max(0.0, now - self._last_finish_t)
        if self._busy_n:
            usual = self._busy_gap
        elif self._calm_n:  # one request at a time: against the usual pause between them
            usual = self._calm_idle
        else:
            usual = idle
        if idle < self.gap_factor * usual or (idle == usual and idle > 0.0):
            self._calm_idle = idle if self._calm_n == 0 else \
                self._calm_idle + self.alpha * (idle - self._calm_idle)
            self._calm_n += 1
            return
        # Lockstep when most of the round just ended came back from the one before it.
        visitors = self._visited
        if visitors and self._previous:
            back = sum(1 for agent in visitors if agent in self._previous) / len(visitors)
            self._recur = back if self._recur < 0 else self._recur + self.alpha * (
                back - self._recur)
        self.rounds += 1
        self._round_length = self.arrivals - self._round_start
        self._round_start = self.arrivals
        self._previous, self._visited = visitors, set()

    @property
    def lockstep(self) -> bool:
        """Whether rounds are seen and their agents come back round after round."""
        return self.rounds >= 2 and self._round_length > 0 and self._recur >= 0.6

    def _ahead(self, a: _Agent) -> tuple[float, str, float]:
        """How many arrivals from now the agent (whose call just finished) calls again, the
        signal that says so, and what its cycle alone says (the fallback).

        Its *cycle* (arrivals from one of its calls to the next) repeats in a pattern: the next
        one is the cycle that followed a cycle like its last one, last time (a chained call
        after a long wait, a long wait after a chained call), else its last cycle. A cycle of
        one or two arrivals that is still ahead is a chained call. Under lockstep rounds a
        call that does not chain comes at its position of this round in the next one."""
        if not a.cycle:
            return math.inf, "", math.inf
        cycle = a.after.get(cycle_class(a.cycle), a.cycle)
        n = self.arrivals
        by_cycle = max(1.0, a.last_call + cycle - n + 1.0)
        if cycle <= 2 and a.last_call + cycle >= n:  # right after its own call: chained
            return by_cycle, "chain", by_cycle
        if self.lockstep and a.visit_round == self.rounds:
            target = self._round_start + self._round_length + a.position  # an arrival index
            return max(1.0, target - n + 1.0), "round", by_cycle
        return by_cycle, "cycle", by_cycle

    def _successor(self, a: _Agent) -> str | None:
        agent = a.successor
        if agent is None:
            return None
        count = a.successors[agent]
        return agent if count >= 2 and 2 * count >= a.finishes else None

    def _predict(self, agent: str, a: _Agent, ahead: float) -> None:
        """Place ``agent`` ``ahead`` arrivals from now (1: the next one; ``inf``: unknown)."""
        if math.isinf(ahead):
            self._key.pop(agent, None)
            self._heap.versions.drop(agent)
            return
        self._set_key(agent, a, self.arrivals + ahead - 1.0)

    def time_of(self, arrival: float) -> float:
        """The server time at which arrival index ``arrival`` is expected (the long-run rate
        from the last arrival)."""
        last = self._last_arrival_t if self._last_arrival_t is not None else self._now()
        return last + (arrival - (self.arrivals - 1)) * self._rate()

    def arrival_at(self, t: float) -> float:
        """The arrival index expected at server time ``t`` (the inverse of :meth:`time_of`)."""
        last = self._last_arrival_t if self._last_arrival_t is not None else self._now()
        return self.arrivals - 1 + (t - last) / self._rate()

    def _rate(self) -> float:
        """Seconds per arrival; one until two arrivals have measured it (any positive rate
        keeps the order)."""
        return self._spa if self._spa > 0 else 1.0

    def _set_key(self, agent: str, a: _Agent, key: float) -> None:
        self._key[agent] = key
        self._period_of[agent] = self._round_length if self.lockstep else max(1, a.cycle)
        self._heap.push((key, self._heap.versions.stamp(agent), agent))
        self.predictions += 1

    # -- the distance protocol's hooks --------------------------------------------------------

    def _predicted_key(self, agent_id: str) -> float:
        return self._key.get(agent_id, UNKNOWN)

    def _predicted_distance(self, agent_id: str) -> float:
        """Seconds until its predicted arrival, at the long-run rate (0 when it is late)."""
        key = self._key.get(agent_id)
        return math.inf if key is None else max(0.0, self.time_of(key) - self._now())

    def _nearest_predicted(self, k: int) -> list[str]:
        pending = self._pending
        out: list[str] = []
        taken: list[tuple[float, int, str]] = []
        # Looking at most 4k entries deep keeps this O(k log n) however few agents qualify.
        while len(out) < k and len(taken) < 4 * k:
            entry = self._heap.pop()
            if entry is None:
                break
            taken.append(entry)
            agent = entry[-1]
            # Prefetching is a bet: made only for agents whose last call came where predicted.
            # (A wrong prefetch costs a copy and evicts someone; the order above still ranks
            # every prediction for eviction.)
            if agent not in pending and self._agents[agent].hit:
                out.append(agent)
        self._heap.restore(taken)
        return out

    @property
    def estimated(self) -> int:
        """Agents with a live prediction."""
        return len(self._key)
