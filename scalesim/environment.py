"""The simulation clock that drives the serving engine.

:class:`SimEnvironment` is a :class:`simpy.Environment` whose :meth:`step` interleaves two kinds of
work: simpy's events, in time order, and iterations of the LLM engine. Agents that ask the LLM
only queue their requests. A call may take simulated time, its *duration* (``llm(...,
duration=d)``, or the world's default :attr:`SimEnvironment.call_duration`): the agent is busy
thinking until its *due time*, submit time plus duration, and resumes with the completion
exactly then.

The engine runs only when it must: when the clock is about to reach a call it has not answered.
Until then the clock moves on over the world's events, other agents call too, and the calls of
many instants share the engine's batches; the scheduler serves them earliest-due first.

A call's event is scheduled when the call is made, at its due time, after every other event of
that time (:data:`ANSWER` priority) and after the calls due then that were made before it. An
answer the engine gives earlier is *held* until the event fires. So the order in which agents
resume is fixed by the simulation alone: neither the engine's speed nor which calls it happened
to finish in one iteration (which memory decides, through hits and misses) changes it, and a
seeded run makes the same calls under every memory policy, budget and executor. With duration 0
(the default) a call is due at once: every event of the instant runs first, so every call of
the instant is batched together; then the agents resume one at a time in request order, each
after the previous one's consequences at that instant.

With a :attr:`SimEnvironment.replay` (:mod:`scalesim.replay`), a call that matches an earlier
run's record is answered from it at once, and its agent resumes exactly where it would live.

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
from simpy.events import NORMAL, PENDING, EventPriority

from runtime import Completion, Request, RequestError
from runtime.interface import EngineInterface
from runtime.replicas import ReplicaFailure
from scalesim.occupancy import EngineOccupancy

if TYPE_CHECKING:
    from scalesim.replay import Replay
    from scalesim.turns import TurnOrder


#: The priority of an answer in simpy's event queue: after every other event of its due time.
ANSWER = EventPriority(NORMAL + 1)


class LLMCall(simpy.Event):
    """The event an agent yields on to wait for its LLM reply.

    It is scheduled when made, at its :attr:`due` time with priority :data:`ANSWER`: after every
    other event of that time, and after the calls due then that were made before it. Its value
    is the :class:`~runtime.Completion`, set when the engine (or a record) answers it, which the
    environment makes sure happens before the clock reaches the event. If the request fails,
    the event fails with a :class:`~runtime.RequestError`, raised inside the waiting agent's
    process.
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
        #: the engine's answer once it has one (held until the event fires at :attr:`due`)
        self.completion: Completion | None = None
        # The environment's bookkeeping comes first, before the waiting process resumes. The
        # time is pushed as it is, not as a delay from now, so the agent resumes at exactly
        # ``due`` (``now + (due - now)`` need not be ``due`` in floating point).
        self.callbacks.append(env._finish)
        heapq.heappush(env._queue, (due, ANSWER, next(env._eid), self))

    def answer(self, completion: Completion) -> None:
        """Give the call its answer, which its agent gets when the event fires."""
        self.completion = completion
        self._ok = completion.ok
        self._value = completion if completion.ok else RequestError(completion.error)


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
        #: what the engine's iterations did, and the calls in flight over simulated time
        self.occupancy = EngineOccupancy()
        #: Called with ``(call, completion)`` for every finished call, as its agent resumes.
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
            # live iterations, should the run go live, are counted after the recorded ones
            self.iterations = max(self.iterations, recorded.iteration)
            self.in_flight[recorded.request_id] = call
            self._answer(call, recorded.completion(recorded.request_id, time.perf_counter()))
            return call
        if self.replay is not None and request.request_id < 0:
            request.request_id = self.replay.next_request_id()  # unique beside replayed ones
        self.in_flight[self.engine.submit(request)] = call
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
        """When the next :meth:`step` acts, at the latest: the next event, an answer among them
        (``inf``: nothing is left)."""
        return self.peek()

    def step(self) -> None:
        queue = self._queue
        before = self._now
        if queue:
            upcoming, _, _, head = queue[0]
            if head.__class__ is LLMCall and head._value is PENDING:
                self._run_engine_iteration()  # the clock is about to reach an unanswered call
                return
            if before < upcoming < math.inf:
                self.occupancy.record_clock(len(self.in_flight), upcoming - before)
        try:
            super().step()
        finally:  # also when the step ends the run (simpy raises StopSimulation)
            if self._now != before:
                self.observer.on_advance()

    def _run_engine_iteration(self) -> None:
        self.observer.checkpoint()
        self.iterations += 1
        try:
            step = self.engine.step()
        except ReplicaFailure as failure:  # the requests of a dead replica fail, then the run
            for completion in failure.completions:
                call = self.in_flight[completion.request_id]
                self._answer(call, completion)
                self._finish(call)  # recorded at once: the run stops after this iteration
            raise
        self.occupancy.record_step(step)
        for completion in step.finished:
            call = self.in_flight[completion.request_id]
            call.iteration = self.iterations
            self._answer(call, completion)

    def _answer(self, call: LLMCall, completion: Completion) -> None:
        """Give ``call`` its answer; one due later than now is *held* until then, and the
        observer and :attr:`held_listeners` hear of it (the agent is no longer waiting on the
        engine, only on the clock)."""
        call.answer(completion)
        if call.due > self._now:
            self.observer.on_answered(call.agent_id, call.due)
            for listener in self.held_listeners:
                listener(call)

    def _finish(self, event: simpy.Event) -> None:
        """The environment's part when a call's event fires (its agent resumes just after):
        the call leaves :attr:`in_flight`, and the observer and :attr:`completion_listeners`
        hear of it. A call already finished (its replica failed) is not finished twice."""
        call = event
        assert isinstance(call, LLMCall) and call.completion is not None
        if self.in_flight.pop(call.completion.request_id, None) is None:
            return
        self.observer.on_finish(call.agent_id)
        for listener in self.completion_listeners:
            listener(call, call.completion)
