"""Invocation distance: which agent calls the LLM next, read off the simulation itself.

:class:`DistanceOracle` keeps, for every agent, an estimated sim time of its next LLM call and
serves the memory manager's :class:`runtime.memory.DistanceSource` questions (``distance``,
``nearest``). What the simulation knows comes from several *sources*:

* a **pending call** (queued or running): at its due time, minus the world's default call
  duration. A call that takes the default duration is thus placed when it was made (distance
  0, before every predicted call); a call due sooner or later than that is placed where a
  predicted call due then would be, so the memory manager fetches for calls in the order the
  scheduler serves them (earliest due first). For eviction, the calls due no later than the
  default all rank as now, and recency breaks their tie (:meth:`DistanceOracle.order_key`);
* a **held** answer (a call the engine answered ahead of its due time): the agent calls again
  no sooner than it resumes, at that due time — a bound; the call is no longer pending;
* **timers** (``Agent.wait``): the wake-up time already in the simpy event queue — exact;
* **deadlines**: the timeout of a ``receive`` or ``wait_for``, a bound on the wake-up;
* **messages in transit** (``Agent.send(..., delay=d)``): an agent blocked on ``receive`` wakes
  when the first message on its way to it arrives — exact, like a timer;
* the **interaction graph**: an agent blocked on ``receive`` wakes when an in-neighbour sends to
  it. A neighbour ``u`` acts at its own next wake-up (its timer, deadline, turn or hint, or now
  while it calls) and, from the messages recorded on the edge, sends to ``v`` once every
  ``wakes(u) / messages(u, v)`` wake-ups, each a mean wake interval of ``u`` apart; the estimate
  is the earliest such arrival (plus ``edge_delay``), never later than the agent's own deadline;
* **turn orders** (:mod:`scalesim.turns`): the current speaker first, then each member
  ``turn_delay`` after the one before it;
* **hints** (``World.hint(agent, eta)``): what only the world author knows;
* **learned call rates** (:mod:`scalesim.call_rates`): a wake-up is not a call. The estimate of
  a blocked agent is its next wake-up *plus* the learned mean time from a wake-up at that
  blocking site to the agent's next call.

The estimate is the earliest over the trusted sources. Every source is also measured
(:mod:`scalesim.prediction_quality`); one that orders agents worse than recency is distrusted
and left out, so the agents only it would rank fall back to recency (the eviction order's tie
break) and a world the oracle mispredicts is served like LRU.

**No stale estimate is a distance.** Each source only counts while its time lies ahead of the
clock: a timer or deadline that passed without the agent reporting (it blocked on an event the
oracle cannot see), a hint that did not come true, a neighbour that acted without sending. When
the clock moves, estimates that fell behind it are re-estimated from what is still ahead (the
last resort: one mean call interval of the agent from now); so for every agent without a
pending call the estimate is at least ``env.now``.

The agents are ordered by their estimate in a :class:`~runtime.memory.lazy_heap.LazyHeap`, so a
timer-driven world costs O(log n) per event and :meth:`DistanceOracle.nearest` O(k log n);
nothing re-sorts all agents (a change of trust re-estimates each agent once). A pending call is
due, never stale: once the clock has passed its key, its entry is *parked* in a heap of its own
(the same entry, so :meth:`~DistanceOracle.nearest` merges the two in one order). With calls
that take simulated time hundreds of calls are pending, and every advance of the clock would
otherwise step over all of them again.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any

from runtime.memory.distance import CallTrackingSource
from runtime.memory.lazy_heap import LazyHeap
from scalesim.call_rates import CallRates
from scalesim.prediction_quality import PredictionQuality

if TYPE_CHECKING:
    from scalesim.environment import SimEnvironment

#: Sources that give a wake-up time (the learned lag is added to them); the others a call time.
WAKE_SOURCES = ("timer", "deadline", "message", "graph", "active")
#: The call-rate site of an agent whose call just returned.
AFTER_CALL = ("call", "returned")
_INF = math.inf


def _no_lag(agent: str, block: Block, cause: str) -> float:
    return 0.0


def _place(heap: LazyHeap[str], etas: dict[str, float], agent: str, eta: float) -> bool:
    """Put ``agent`` at ``eta`` in ``heap`` (``etas`` the estimates it holds); ``True`` if that
    changed anything."""
    versions = heap.versions
    if etas.get(agent) == eta and agent in versions:
        return False
    if eta == _INF or eta == -_INF:
        if agent not in etas and agent not in versions:
            return False
        etas.pop(agent, None)
        versions.pop(agent, None)
    else:
        etas[agent] = eta
        heap.push((eta, versions.stamp(agent), agent))
    return True


class Block:
    """What a blocked agent waits on: a timer (``until`` exact) or a receive (``until``: the
    deadline, ``inf`` for none), issued at ``site``."""

    __slots__ = ("kind", "site", "until")

    def __init__(self, kind: str, site: str, until: float) -> None:
        self.kind, self.site, self.until = kind, site, until


class DistanceOracle(CallTrackingSource):
    """Estimated next-call times of every agent; an ``OrderedDistanceSource``.

    The pending calls and the watchers are kept by the base class. A pending call stays in the
    oracle's estimate too, at its due time less ``call_duration`` (the world's default), so
    :meth:`order_key`, :meth:`distance` and :meth:`nearest` read the estimates alone; the graph
    source reads a calling neighbour as acting when its call returns, at its due time.
    """

    def __init__(self, env: SimEnvironment, graph: Any = None, *, edge_delay: float = 0.0,
                 turn_delay: float = 1e-6, window: int = 64,
                 call_duration: float = 0.0) -> None:
        super().__init__()
        self.env = env
        self.graph = graph
        self.edge_delay = edge_delay
        self.turn_delay = turn_delay
        self.window = window
        self.rates = CallRates()
        self.prediction = PredictionQuality(window)
        self.call_duration = call_duration
        self._due: dict[str, float] = {}  # agent with a pending call -> when that call is due
        self._due_now: set[str] = set()  # pending calls keyed PENDING_KEY (see order_key)
        self._block: dict[str, Block] = {}
        self._active: dict[str, float] = {}  # agent -> when its call returned (acting now)
        self._resumes: dict[str, float] = {}  # agent with an answer held -> when it resumes
        self._arrival: dict[str, float] = {}  # receive-blocked agent -> graph estimate
        self._transit: dict[str, list[float]] = {}  # agent -> arrivals of messages on the way
        self._silent: set[str] = set()  # agents that never call: tracked, never ranked
        self._hint: dict[str, float] = {}
        self._turn: dict[str, float] = {}
        self._eta: dict[str, float] = {}
        self._source: dict[str, str] = {}
        self._raw: dict[str, float] = {}  # the estimate if every source were trusted
        self._heap: LazyHeap[str] = LazyHeap()
        self._raw_heap: LazyHeap[str] = LazyHeap()
        # pending calls' entries the clock has passed, out of on_advance's way (module doc)
        self._parked_heap: LazyHeap[str] = LazyHeap(self._heap.versions)
        self._raw_parked_heap: LazyHeap[str] = LazyHeap(self._raw_heap.versions)
        self._parked: set[str] = set()  # the agents with a parked entry
        self.calls = 0

    # -- hooks: what agents and the environment report ----------------------------------------

    def on_submit(self, agent: str, due: float | None = None) -> int | None:
        """``agent`` issued a call now, due at ``due`` (default: now); returns its predicted
        rank, if a snapshot predicted it."""
        self.calls += 1
        rank = self.prediction.observe_call(agent, self.env.now)
        before = self._acts_at(agent)
        self._wake(agent)
        self.rates.called(agent, self.env.now)
        self._active.pop(agent, None)
        started = self._start_call(agent)
        self._due[agent] = self.env.now if due is None else due
        self._hint.pop(agent, None)
        self._moved(agent, before)
        if started and self._due[agent] - self.call_duration <= self.env.now:
            self._due_now.add(agent)  # its order key is PENDING_KEY (see order_key)
            self._changed(agent)
        return rank

    def on_answered(self, agent: str, due: float) -> None:
        """The engine answered ``agent``'s call ahead of ``due``, when the agent resumes.

        Until then the call is not pending: its memory is next needed for the agent's next
        call, which comes no sooner than ``due`` (the ``held`` source: that bound). Kept
        pending, an answered agent would rank before every call still queued, and under calls
        that take simulated time it would hold memory the queued calls need first."""
        before = self._acts_at(agent)
        ended = self._answer_early(agent)
        if ended:
            del self._due[agent]
        self._active[agent] = self._resumes[agent] = due
        self._moved(agent, before)
        if ended and agent in self._due_now:  # its order key leaves PENDING_KEY
            self._due_now.discard(agent)
            self._changed(agent)

    def on_finish(self, agent: str) -> None:
        """``agent``'s call returned; until it blocks again it is acting now."""
        before = self._acts_at(agent)
        ended = not self._hand_over(agent) and self._end_call(agent)
        if ended:
            del self._due[agent]
        self._resumes.pop(agent, None)
        self._active[agent] = self.env.now
        # A returned call is a wake-up too: how soon the agent calls again is learned alike.
        self.rates.woke(agent, AFTER_CALL, self.env.now, wakeup=False)
        self._moved(agent, before)
        if ended and agent in self._due_now:  # its order key leaves PENDING_KEY
            self._due_now.discard(agent)
            self._changed(agent)

    def on_wait(self, agent: str, until: float, site: str = "wait") -> None:
        """``agent`` sleeps until exactly ``until`` (a wait issued at ``site``)."""
        self._block_on(agent, Block("timer", site, until))

    def on_receive(self, agent: str, deadline: float = math.inf, site: str = "receive") -> None:
        """``agent`` blocks until something happens, at the latest at ``deadline``."""
        self._block_on(agent, Block("receive", site, deadline))

    def never_calls(self, agent: str) -> None:
        """``agent`` never calls: its blocks still time its messages to others (the graph
        source), but it is in no ranking, no snapshot and no distance."""
        self._silent.add(agent)

    def on_transit(self, agent: str, arrival: float) -> None:
        """A message to ``agent`` arrives at exactly ``arrival``."""
        before = self._acts_at(agent)
        heapq.heappush(self._transit.setdefault(agent, []), arrival)
        self._moved(agent, before)

    def _next_transit(self, agent: str) -> float:
        """The arrival of the first message on its way to ``agent`` (``inf``: none); arrivals
        the clock passed are dropped (those messages are in the inbox)."""
        arrivals = self._transit.get(agent)
        if not arrivals:
            return math.inf
        now = self.env.now
        while arrivals and arrivals[0] < now:
            heapq.heappop(arrivals)
        if not arrivals:
            del self._transit[agent]
            return math.inf
        return arrivals[0]

    def on_exit(self, agent: str) -> None:
        before = self._acts_at(agent)
        self.rates.forget(agent)
        for table in (self._pending, self._due, self._block, self._active, self._resumes,
                      self._arrival, self._hint, self._turn, self._transit):
            table.pop(agent, None)
        self._due_now.discard(agent)
        self._moved(agent, before)

    def hint(self, agent: str, eta: float) -> None:
        """The world says ``agent`` will call at about sim time ``eta`` (absolute)."""
        before = self._acts_at(agent)
        self._hint[agent] = eta
        self._moved(agent, before)

    def use_graph(self, graph: Any) -> None:
        """Estimate receive-blocked agents from their in-neighbours on ``graph``."""
        self.graph = graph

    @property
    def graph(self) -> Any:
        """The interaction graph (a networkx ``DiGraph``; ``None``: none)."""
        return self._graph

    @graph.setter
    def graph(self, graph: Any) -> None:
        self._graph = graph
        # A networkx DiGraph's own adjacency dicts (``pred[v][u]`` is the edge u -> v), read
        # directly: its ``pred``/``succ`` views make two objects per lookup, and the graph
        # source looks up neighbours at every wake-up. Any graph with those views works too.
        self._pred: Any = None if graph is None else getattr(graph, "_pred", graph.pred)
        self._succ: Any = None if graph is None else getattr(graph, "_succ", graph.succ)

    def on_advance(self) -> None:
        """The clock moved forward: re-estimate every estimate it overtook."""
        now = self.env.now
        for heap, etas, parked in ((self._heap, self._eta, self._parked_heap),
                                   (self._raw_heap, self._raw, self._raw_parked_heap)):
            aside = []
            seen: set[str] = set()
            while True:
                entry = heap.pop()
                if entry is None:
                    break
                if entry[0] >= now:
                    aside.append(entry)
                    break
                agent = entry[-1]
                # A call in flight is due, not stale: parked; an agent already re-estimated in
                # this pass is not taken again (a guard: re-estimates are never behind the clock).
                if agent in self._pending:
                    parked.push(entry)
                    self._parked.add(agent)
                    continue
                if agent in seen:
                    aside.append(entry)
                    continue
                seen.add(agent)
                etas.pop(agent, None)  # forces _update to push a fresh entry
                self._refresh_arrival(agent)
                self._update(agent)
            heap.restore(aside)

    def _block_on(self, agent: str, block: Block) -> None:
        before = self._acts_at(agent)
        self._wake(agent)
        self._pending.pop(agent, None)  # blocked: whatever it called has returned
        self._due.pop(agent, None)
        self._active.pop(agent, None)
        self._block[agent] = block
        if block.kind == "receive":
            self._arrival[agent] = self._graph_arrival(agent)
        else:
            self._arrival.pop(agent, None)
        self._moved(agent, before)

    def _wake(self, agent: str) -> None:
        """``agent`` reports again: if it was blocked, it woke now, at its block's site."""
        block = self._block.pop(agent, None)
        if block is not None:
            self.rates.woke(agent, self._site(block, self._woken_by(agent, block)), self.env.now)
            self._arrival.pop(agent, None)

    def _woken_by(self, agent: str, block: Block) -> str:
        if block.kind == "timer":
            return "timer"
        if self.env.now >= block.until:
            return "deadline"
        # A message that travelled is learned apart from one sent at once: at one receive, a
        # shipment that arrives may lead to a call every time, a customer's purchase rarely.
        arrivals = self._transit.get(agent)
        return "message" if arrivals and arrivals[0] == self.env.now else "event"

    @staticmethod
    def _site(block: Block, cause: str) -> tuple[str, str]:
        # A receive ends at its deadline or at a message, and the two need not lead to calls
        # alike (the daily outing against a neighbour's news): they are learned apart.
        return block.site, cause

    def _moved(self, agent: str, acted_before: float) -> None:
        """Re-estimate ``agent`` after it reported; its receivers too if it acts at another time."""
        self._update(agent)
        if self._acts_at(agent) != acted_before:
            self._tell_receivers(agent)

    # -- the estimate -------------------------------------------------------------------------

    def eta(self, agent: str) -> float:
        """Estimated sim time of ``agent``'s next call (``inf``: unknown)."""
        return self._eta.get(agent, math.inf)

    def order_key(self, agent_id: str) -> float:
        """The estimated call time: orders agents as :meth:`distance` does, without drifting.

        A pending call due no later than a call of the default duration made when it was
        has :attr:`PENDING_KEY`, before every estimate: it is in the engine's hands (distance
        0), and its memory is needed whenever the scheduler reaches it. Due times alone do
        not say when that is: a queued call whose memory is resident needs a few tokens of an
        iteration's budget, one whose persona KV was dropped a whole prefill. So the eviction
        order breaks the tie by recency, as it does for ``belady``'s recorded future, which
        cannot order queued calls either. (Modeled: with these calls ordered by due time,
        town at 1.8 minutes a call lost to ``lru``, 528.8 against 522.5 s; tied, 519.0.) A
        call due later than that keeps its place among the estimates, at its due time less the
        default duration. :meth:`nearest` lists every pending call by due time: prefetches go
        in the order the scheduler admits.
        """
        if agent_id in self._due_now:
            return self.PENDING_KEY
        return self._eta.get(agent_id, math.inf)

    def distance(self, agent_id: str) -> float:
        """How long until the estimate (0 for a pending call of the default duration)."""
        return max(0.0, self._eta.get(agent_id, math.inf) - self.env.now)

    def source_of(self, agent: str) -> str | None:
        """Which source gave ``agent``'s estimate (``None``: unknown)."""
        return self._source.get(agent) if agent in self._eta else None

    def nearest(self, k: int) -> list[str]:
        """The ``k`` agents with the smallest estimate, nearest first: O(k log n).

        Pending calls are among them at their keys (:meth:`order_key`), so one submitted now
        may come after a prediction of now: both are distance 0.
        """
        self._refresh_turns()
        entries = heapq.merge(self._parked_heap.smallest(k), self._heap.smallest(k))
        return [entry[-1] for entry in itertools.islice(entries, k)]

    def estimates(self, agent: str, with_turn: bool = True,
                  lagged: bool = True) -> dict[str, float]:
        """Every source's current estimate of ``agent``'s next call, trusted or not.

        Only estimates ahead of the clock count. A blocked agent's wake-up sources include the
        learned lag of its blocking site (unless ``lagged`` is false: wake-up times); an agent
        blocked on a timer ignores turn orders (its wake-up is exact). ``fallback`` appears
        only when no other source has an estimate.
        """
        now = self.env.now
        lag = self._lag if lagged else _no_lag
        out: dict[str, float] = {}
        hint = self._hint.get(agent)
        if hint is not None and hint >= now:
            out["hint"] = hint
        block = self._block.get(agent)
        if block is not None:
            if block.kind == "timer":
                if block.until >= now:
                    out["timer"] = block.until + lag(agent, block, "timer")
            else:
                if now <= block.until < math.inf:
                    out["deadline"] = block.until + lag(agent, block, "deadline")
                # (Most agents have no message on its way: no call to find that out.)
                transit = self._next_transit(agent) if agent in self._transit else math.inf
                if transit < math.inf and transit <= block.until:  # it ends the receive
                    out["message"] = transit + lag(agent, block, "message")
                arrival = self._arrival.get(agent, math.inf)
                if now <= arrival < math.inf:
                    out["graph"] = arrival + lag(agent, block, "event")
        elif agent in self._resumes:
            # Its answer is held until it resumes: it calls no sooner (a bound, like a deadline).
            out["held"] = self._resumes[agent]
        elif agent in self._active:
            # Acting now; until it blocks where the oracle can see, one learned lag after its
            # call returned (its next call, or the last resort below once that has passed).
            since = self._active[agent]
            after = self.rates.lag(agent, AFTER_CALL) if lagged else 0.0
            if since + after >= now:
                out["active"] = since + after
        if with_turn and (block is None or block.kind != "timer"):
            turn = self._turn.get(agent)
            if turn is not None and turn >= now:
                out["turn"] = turn
        if not out and (block is not None or agent in self._active):
            interval = self.rates.call_interval(agent)
            if interval is not None:
                out["fallback"] = now + interval
        return out

    def explain(self, agent: str) -> dict[str, float]:
        """Why :meth:`eta` is what it is: the estimates it takes the earliest of, by source.

        That is ``pending`` (the pending call's key), or every trusted source's
        estimate, with the learned lag while that is trusted; empty when nothing is known. They
        are read now, while :meth:`eta` was set when the agent last changed: a learned lag that
        moved since (other agents' calls move its prior) shows as a small difference.
        Diagnostics only: the oracle itself never builds this dict.
        """
        if agent in self._pending:
            return {"pending": self._pending_key(agent)}
        trusted = self.prediction.trusted
        candidates = self.estimates(agent, lagged=trusted("learned"))
        return {name: eta for name, eta in candidates.items() if trusted(name)}

    def _estimate(self, agent: str, with_turn: bool = True) -> tuple[float, float, str | None]:
        """(trusted estimate, estimate over every source, the trusted estimate's source)."""
        if agent in self._pending:
            key = self._pending_key(agent)
            return key, key, "pending"
        candidates = self.estimates(agent, with_turn)
        if not candidates:
            return math.inf, math.inf, None
        # The earliest estimate and its source (the first of equals), in one pass.
        items = iter(candidates.items())
        first, raw = next(items)
        for name, value in items:
            if value < raw:
                first, raw = name, value
        distrusted = self.prediction.distrusted
        if not distrusted:  # the common case: the estimate is the earliest of them all
            return raw, raw, first
        if "learned" in distrusted:
            candidates = self.estimates(agent, with_turn, lagged=False)
        best, source = math.inf, None
        for name, value in candidates.items():
            if name not in distrusted and value < best:
                best, source = value, name
        return best, raw, source

    def _pending_key(self, agent: str) -> float:
        """Where ``agent``'s pending call stands: its due time less the default duration."""
        return self._due[agent] - self.call_duration

    def _lag(self, agent: str, block: Block, cause: str) -> float:
        # The key _site makes, without a call of its own: asked for in every estimate.
        return self.rates.lag(agent, (block.site, cause))

    def _update(self, agent: str) -> None:
        if agent in self._silent:
            return
        if agent in self._parked and agent not in self._pending:
            # Its call returned: a fresh entry goes back among the estimates the clock overtakes.
            self._parked.discard(agent)
            self._eta.pop(agent, None)
            self._raw.pop(agent, None)
        eta, raw, source = self._estimate(agent)
        self._source[agent] = source or ""
        # _place, then the watchers, called directly: ~700,000 re-estimates in a 30,000-call
        # run of 150,000 users (each agent's first block, a change of trust, ~13 per call).
        _place(self._raw_heap, self._raw, agent, raw)
        if _place(self._heap, self._eta, agent, eta):
            for callback in self._watchers:
                callback(agent)

    # -- the interaction graph ----------------------------------------------------------------

    def _acts_at(self, agent: str) -> float:
        """When ``agent`` next acts by what it alone knows (not by its own neighbours)."""
        if agent in self._pending:
            return self._due[agent]
        if agent in self._active:
            return self._active[agent]
        block = self._block.get(agent)
        if block is None:
            return math.inf
        return min(block.until, self._hint.get(agent, math.inf), self._turn.get(agent, math.inf))

    def _graph_arrival(self, agent: str) -> float:
        """The earliest expected message to ``agent`` from its in-neighbours (``inf``: none)."""
        pred = self._pred
        if pred is None or agent not in pred:
            return math.inf
        now, best = self.env.now, math.inf
        for u, edge in pred[agent].items():
            if u == agent:
                continue
            acts = self._acts_at(u)
            if acts < now or acts + self.edge_delay >= best:
                continue
            gap = 0.0
            interval = self.rates.wake_interval(u)
            if interval:
                wakes, messages = self.rates.wake_count(u), edge.get("messages", 1) or 1
                if wakes > messages:
                    gap = (wakes / messages - 1.0) * interval
            best = min(best, acts + gap + self.edge_delay)
        return best

    def _refresh_arrival(self, agent: str) -> None:
        block = self._block.get(agent)
        if block is not None and block.kind == "receive":
            self._arrival[agent] = self._graph_arrival(agent)

    def _tell_receivers(self, agent: str) -> None:
        """``agent``'s own next action moved: re-estimate its receive-blocked out-neighbours."""
        succ = self._succ
        if succ is None or agent not in succ:
            return
        for v in succ[agent]:
            block = self._block.get(v)
            if block is None or block.kind != "receive" or v == agent:
                continue
            arrival = self._graph_arrival(v)
            if arrival != self._arrival.get(v):
                self._arrival[v] = arrival
                self._update(v)

    # -- turn orders --------------------------------------------------------------------------

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
                own = self._estimate(member, with_turn=False)[0]
                block = self._block.get(member)
                exact = member in self._pending or (block is not None and block.kind == "timer")
                previous = own if exact else min(own, guess)
        # Dict order, not set order: a set of strings iterates by hash, which changes per process.
        for member in [m for m in self._turn if m not in fresh]:
            del self._turn[member]
            self._moved(member, math.nan)
        for member, eta in fresh.items():
            if self._turn.get(member) != eta:
                self._turn[member] = eta
                self._moved(member, math.nan)

    # -- prediction quality -------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Called before each engine iteration: refresh turns; open a snapshot if none is open."""
        # Turn positions change without a hook (a member speaks, an order closes); without this
        # an agent whose conversation ended stays "next to speak" until the next prefetch pass.
        self._refresh_turns()
        prediction = self.prediction
        if prediction.is_open:
            if not prediction.due():
                return
            self._retrust(prediction.close())
        # The agents nearest by the estimate in use are scored; those nearest by every source
        # (trusted or not) are added, so that a distrusted source goes on being measured.
        scored, order = self._nearest_not_pending(self._heap), []
        if len(scored) < 2:
            return
        seen = set(scored)
        order = scored + [a for a in self._nearest_not_pending(self._raw_heap) if a not in seen]
        combined = {a: self.eta(a) for a in order}
        estimates = {}
        for agent in order:
            by_source = self.estimates(agent)
            unlagged = self.estimates(agent, lagged=False)
            wake = [s for s in by_source if s in WAKE_SOURCES]
            if wake:
                by_source["learned"] = min(by_source[s] for s in wake)
                by_source["wake"] = min((unlagged[s] for s in wake if s in unlagged),
                                        default=math.inf)
            by_source["recency"] = -self.rates.last_call(agent)
            estimates[agent] = by_source
        prediction.open(combined, estimates, scored=len(scored))

    def _nearest_not_pending(self, heap: LazyHeap[str]) -> list[str]:
        return [e[-1] for e in heap.smallest(self.window, skip=self._pending)]

    def _retrust(self, changed: set[str]) -> None:
        """Some sources' trust changed: re-estimate every agent once."""
        if not changed:
            return
        for agent in list(dict.fromkeys([*self._raw, *self._eta])):  # dict order: reproducible
            self._update(agent)

    def quality(self) -> dict[str, Any]:
        """Prediction quality for ``summary.json``: overall, per source, and the call rates."""
        if self.prediction.is_open:
            self.prediction.close()
        return {**self.prediction.summary(), "calls": self.calls,
                "call_rates": self.rates.summary()}
