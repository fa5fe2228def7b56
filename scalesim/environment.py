"""The simulation clock that drives the serving engine.

:class:`SimEnvironment` is a :class:`simpy.Environment` whose :meth:`step` interleaves two kinds of
work: simpy's events, in time order, and iterations of the LLM engine. Agents that ask the LLM
only queue their requests. A call may take simulated time, its *duration* (``llm(...,
duration=d)``, or the world's default :attr:`SimEnvironment.call_duration`): the agent is busy
thinking until its *due time*, submit time plus duration, and resumes with the completion
exactly then.

The engine runs only when it must: when the clock would otherwise pass the due time of a call it
has not answered (the next event, or the next answer to hand over, lies beyond it). Until then the
clock moves on over the world's events, other agents call too, and the calls of many instants
share the engine's batches; the scheduler serves them earliest-due first. A call the engine
answers before its due time is *held*: an event at the due time (a simpy event like any other,
after those already scheduled for then) hands over every answer due then, in request order; the
engine has answered every call due then before the clock gets there. So a seeded run is the
same run every time. With duration 0 (the default) a
call is due at once: the engine runs when the current instant has nothing left to run, answers
succeed their events at the same instant, and every call of one instant is batched together.

With a :attr:`SimEnvironment.replay` (:mod:`scalesim.replay`), a call that matches an earlier
run's record is answered from it instead: it waits, without the engine, for the iteration that
finished it in the recorded run, so the agents resume in the order they did then.

The environment always has an *observer* (:class:`SimObserver`): agents report what they block
on and the environment reports calls to it. A run's observer is the
:class:`~scalesim.distance.DistanceOracle`; without one it is a :class:`NullObserver`, so no
caller has to ask whether there is one. Turn orders (:mod:`scalesim.turns`) register on the
environment, where the oracle reads them. What the engine's iterations did is summed in
:attr:`SimEnvironment.occupancy` (:mod:`scalesim.occupancy`).
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import simpy

from runtime import Completion, Request, RequestError
from runtime.interface import EngineInterface
from runtime.replicas import ReplicaFailure
from scalesim.occupancy import EngineOccupancy

if TYPE_CHECKING:
    from scalesim.replay import RecordedCall, Replay
    from scalesim.turns import TurnOrder


class LLMCall(simpy.Event):
    """The event an agent yields on to wait for its LLM reply.

    Its value is the :class:`~runtime.Completion`, delivered at :attr:`due`. If the request
    fails, the event fails with a :class:`~runtime.RequestError`, raised inside the waiting
    agent's process.
    """

    def __init__(self, env: "SimEnvironment", agent_id: str, request: Request,
                 due: float) -> None:
        super().__init__(env)
        self.agent_id = agent_id
        self.request = request
        self.submit_time = env.now
        #: when the agent resumes: the submit time plus the call's duration
        self.due = due
        self.predicted_rank: int | None = None
        #: this call's place in its agent's sequence of calls (0 for its first)
        self.position = 0
        #: the environment's engine iteration in which it finished (set when it does)
        self.iteration = 0
        #: answered from an earlier run's record (:mod:`scalesim.replay`), not by the engine
        self.replayed = False
        #: the engine's answer once it has one (held until :attr:`due`)
        self.completion: Completion | None = None


class HandOver(simpy.Event):
    """The event at a due time that hands over the answers held for it.

    Like a :class:`simpy.Timeout`, it is triggered when made and fires at its time; unlike one,
    that time is given as it is (``due``), not as a delay from now, so the agents resume at
    exactly the time their calls were due (``now + (due - now)`` need not be ``due`` in floating
    point).
    """

    def __init__(self, env: "SimEnvironment", due: float) -> None:
        super().__init__(env)
        self._ok, self._value = True, None
        heapq.heappush(env._queue, (due, simpy.core.NORMAL, next(env._eid), self))


class SimObserver(Protocol):
    """What the environment and the agents tell about who will call the LLM next."""

    def on_submit(self, agent: str, due: float) -> int | None:
        """``agent`` issued a call now, due at ``due``; returns its predicted rank, if one was
        predicted."""

    def on_answered(self, agent: str, due: float) -> None:
        """The engine answered ``agent``'s call; the answer is held until ``due``, when the
        agent resumes (:meth:`on_finish`)."""

    def on_finish(self, agent: str) -> None: ...

    def on_wait(self, agent: str, until: float, site: str) -> None:
        """``agent`` sleeps until exactly ``until``; ``site`` names where it waits."""

    def on_receive(self, agent: str, deadline: float, site: str) -> None:
        """``agent`` blocks until something happens, at the latest at ``deadline``."""

    def on_exit(self, agent: str) -> None: ...

    def on_transit(self, agent: str, arrival: float) -> None:
        """A message to ``agent`` is on its way and arrives at exactly ``arrival``."""

    def never_calls(self, agent: str) -> None:
        """``agent`` never asks the LLM (``Agent.calls_llm`` is False): it has no rank, but
        what it does may still tell when others call."""

    def hint(self, agent: str, eta: float) -> None: ...

    def use_graph(self, graph: Any) -> None:
        """The world's interaction graph (a networkx ``DiGraph``)."""

    def checkpoint(self) -> None:
        """An engine iteration is about to run."""

    def on_advance(self) -> None:
        """The clock has just moved forward."""

    def quality(self) -> dict[str, Any]:
        """Prediction quality for ``summary.json``."""


class NullObserver:
    """An observer that predicts nothing: the environment of a run without an oracle."""

    def on_submit(self, agent: str, due: float) -> int | None:
        return None

    def on_answered(self, agent: str, due: float) -> None:
        pass

    def on_finish(self, agent: str) -> None:
        pass

    def on_wait(self, agent: str, until: float, site: str) -> None:
        pass

    def on_receive(self, agent: str, deadline: float, site: str) -> None:
        pass

    def on_exit(self, agent: str) -> None:
        pass

    def on_transit(self, agent: str, arrival: float) -> None:
        pass

    def never_calls(self, agent: str) -> None:
        pass

    def hint(self, agent: str, eta: float) -> None:
        pass

    def use_graph(self, graph: Any) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def on_advance(self) -> None:
        pass

    def quality(self) -> dict[str, Any]:
        return {}


@contextmanager
def relaxed_gc(young: int = 500_000) -> Iterator[None]:
    """Run the cyclic garbage collector rarely inside the block.

    A large world keeps millions of long-lived objects (agent processes, stores, graph edges,
    heap entries). With Python's default thresholds the collector rescans them every few
    thousand allocations: 40% of the wall time of a 150,000-agent modeled run. Reference
    counting still frees nearly everything at once; only cyclic garbage waits longer.
    """
    old = gc.get_threshold()
    gc.set_threshold(young, 1000, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def check_duration(duration: float, name: str = "duration") -> float:
    """``duration`` as a float; :class:`ValueError` naming ``name`` unless finite and >= 0."""
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration < 0:
        raise ValueError(f"{name} must be a finite number of simulated time units >= 0, "
                         f"got {duration!r}")
    return float(duration)


class SimEnvironment(simpy.Environment):
    """A simpy environment that runs the LLM engine before its clock passes a call's due time.

    ``observer`` builds the run's :class:`SimObserver` from the environment (for instance
    ``lambda env: DistanceOracle(env)``); by default nothing is observed. ``call_duration`` is
    the duration of a call that names none (see the module docstring). ``engine`` may be
    ``None`` and :meth:`attach`\ ed later: a run sets its world up before the model loads.
    """

    def __init__(self, engine: EngineInterface | None, initial_time: float = 0, *,
                 observer: Callable[["SimEnvironment"], SimObserver] | None = None,
                 call_duration: float = 0.0) -> None:
        super().__init__(initial_time)
        self._engine = engine
        #: homes given before the engine was attached (applied by :meth:`attach`)
        self._placed: dict[str, int] = {}
        self.call_duration = check_duration(call_duration, "call_duration")
        #: every call whose agent has not resumed yet, by request id (unanswered or held)
        self.in_flight: dict[int, LLMCall] = {}
        #: ``(due, request id)`` of the calls the engine has not answered (lazily pruned)
        self._unanswered: list[tuple[float, int]] = []
        #: the request ids of the answered calls held until their due time, by due time
        self._held: dict[float, list[int]] = {}
        #: what the engine's iterations did, and the calls in flight over simulated time
        self.occupancy = EngineOccupancy()
        #: Called with ``(call, completion)`` for every finished call, before the agent resumes.
        self.completion_listeners: list[Callable[[LLMCall, Completion], None]] = []
        #: Called with the agent id of every submitted call (e.g. a recorded-future distance).
        self.submit_listeners: list[Callable[[str], None]] = []
        #: Called with every call answered ahead of its due time, when its answer is held.
        self.held_listeners: list[Callable[[LLMCall], None]] = []
        #: The :class:`~scalesim.turns.TurnOrder` objects created on this environment.
        self.turn_orders: list[TurnOrder] = []
        self.observer: SimObserver = observer(self) if observer is not None else NullObserver()
        #: answers calls from an earlier run's record, where it matches (None: the engine all)
        self.replay: Replay | None = None
        #: engine iterations run so far (replayed ones counted where the record ran them)
        self.iterations = 0
        self._positions: dict[str, int] = {}
        #: recorded answers due now, waiting for their iteration (by their recorded request id)
        self._answered: dict[int, RecordedCall] = {}
        #: calls submitted to the engine that it has not answered yet
        self._engine_calls = 0

    @property
    def engine(self) -> EngineInterface:
        if self._engine is None:
            raise RuntimeError("the simulation's engine is not attached yet: a world's setup() "
                               "cannot ask the LLM (its agents run once the clock starts)")
        return self._engine

    def attach(self, engine: EngineInterface) -> None:
        """Serve this environment's calls with ``engine`` (given after the world was set up)."""
        self._engine = engine
        for agent, replica in self._placed.items():
            engine.place(agent, replica)
        self._placed.clear()

    def place(self, agent: str, replica: int) -> None:
        """Make engine replica ``replica`` the home of ``agent`` (now, or once attached)."""
        if self._engine is None:
            self._placed[agent] = replica
        else:
            self._engine.place(agent, replica)

    def submit(self, agent_id: str, request: Request, duration: float | None = None) -> LLMCall:
        """Hand ``request`` to the engine now (or answer it from :attr:`replay`'s record) and
        return the event of its reply, which the agent gets ``duration`` from now (default
        :attr:`call_duration`)."""
        due = self._now + (self.call_duration if duration is None else check_duration(duration))
        request.due = due
        call = LLMCall(self, agent_id, request, due)
        call.position = self._positions.get(agent_id, 0)
        self._positions[agent_id] = call.position + 1
        call.predicted_rank = self.observer.on_submit(agent_id, due)
        for listener in self.submit_listeners:
            listener(agent_id)
        recorded = (self.replay.answer(agent_id, call.position, request, self.now)
                    if self.replay is not None else None)
        if recorded is not None:
            call.replayed, call.iteration = True, recorded.iteration
            self.in_flight[recorded.request_id] = call
            if due > self._now:  # held until due, handed over with the live answers due then
                call.completion = recorded.completion(recorded.request_id, time.perf_counter())
                self._hold(call)
            else:  # handed over in the group its recorded engine iteration finished
                self._answered[recorded.request_id] = recorded
                heapq.heappush(self._unanswered, (due, recorded.request_id))
            return call
        if self.replay is not None and request.request_id < 0:
            request.request_id = self.replay.next_request_id()  # unique beside replayed ones
        request_id = self.engine.submit(request)
        self.in_flight[request_id] = call
        heapq.heappush(self._unanswered, (due, request_id))
        self._engine_calls += 1
        return call

    def open_turn_orders(self) -> list[TurnOrder]:
        """The turn orders of this environment that are not closed."""
        self.turn_orders[:] = [o for o in self.turn_orders if not o.closed]
        return list(self.turn_orders)

    def run(self, until: Any = None) -> Any:
        """Run as :meth:`simpy.Environment.run` does, with :func:`relaxed_gc`."""
        with relaxed_gc():
            return super().run(until)

    def next_time(self) -> float:
        """When the next :meth:`step` acts, at the latest: the next event (a hand-over of held
        answers among them) or the due time of the earliest unanswered call (``inf``: nothing
        is left)."""
        due = self._earliest_unanswered()
        return min(self.peek(), math.inf if due is None else due)

    def step(self) -> None:
        upcoming = self.peek()
        due = self._earliest_unanswered()
        if due is not None and due <= upcoming and upcoming > self._now:
            self._run_engine_iteration()
            return
        before = self._now
        if before < upcoming < math.inf:
            self.occupancy.record_clock(len(self.in_flight), upcoming - before)
        try:
            super().step()
        finally:  # also when the step ends the run (simpy raises StopSimulation)
            if self._now != before:
                self.observer.on_advance()

    def _earliest_unanswered(self) -> float | None:
        """The due time of the earliest call the engine has not answered (``None``: none)."""
        heap, in_flight = self._unanswered, self.in_flight
        while heap:
            call = in_flight.get(heap[0][1])
            if call is not None and call.completion is None:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _hold(self, call: LLMCall) -> None:
        """Keep ``call``'s answer until its due time: the first answer held for a due time
        schedules the event that hands over every answer due then."""
        held = self._held.get(call.due)
        if held is None:
            held = self._held[call.due] = []
            HandOver(self, call.due).callbacks.append(lambda _: self._hand_over(call.due))
        assert call.completion is not None
        held.append(call.completion.request_id)
        self.observer.on_answered(call.agent_id, call.due)
        for listener in self.held_listeners:
            listener(call)

    def _hand_over(self, due: float) -> None:
        """Hand every answer held for ``due`` (now) to its agent, in request order."""
        for request_id in sorted(self._held.pop(due)):
            self._deliver(self.in_flight[request_id])

    def _run_engine_iteration(self) -> None:
        self.observer.checkpoint()
        self.iterations += 1
        if self._answered:
            self._deliver_answered(live=self._engine_calls > 0)
            if not self._engine_calls:  # no call is the engine's: no engine step
                return
        try:
            step = self.engine.step()
        except ReplicaFailure as failure:  # the requests of a dead replica fail, then the run
            for completion in failure.completions:
                self._engine_calls -= 1
                call = self.in_flight[completion.request_id]
                call.completion = completion
                self._deliver(call)  # at once: the run stops after this iteration
            raise
        self.occupancy.record_step(step)
        for completion in step.finished:
            self._engine_calls -= 1
            call = self.in_flight[completion.request_id]
            call.completion, call.iteration = completion, self.iterations
            if call.due <= self._now:
                self._deliver(call)
            else:
                self._hold(call)

    def _deliver_answered(self, live: bool) -> None:
        """Hand over recorded answers due now: the group of the earliest recorded iteration, in
        recorded order, as that iteration finished them (so agents resume as they did live); all
        of them when live calls run beside them (the trajectory has left the record by then)."""
        first = min(r.iteration for r in self._answered.values())
        if not live:
            self.iterations = max(self.iterations, first)
        wall = time.perf_counter()
        for _, request_id in sorted((r.row, rid) for rid, r in self._answered.items()
                                    if live or r.iteration == first):
            recorded = self._answered.pop(request_id)
            call = self.in_flight[request_id]
            call.completion = recorded.completion(request_id, wall)
            self._deliver(call)

    def _deliver(self, call: LLMCall) -> None:
        """The agent of ``call`` resumes now with its answer (or its error)."""
        completion = call.completion
        assert completion is not None
        del self.in_flight[completion.request_id]
        self.observer.on_finish(call.agent_id)
        for listener in self.completion_listeners:
            listener(call, completion)
        if completion.ok:
            call.succeed(completion)
        else:
            call.fail(RequestError(completion.error))
