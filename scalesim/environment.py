"""The simulation clock that drives the serving engine.

:class:`SimEnvironment` is a :class:`simpy.Environment` whose :meth:`step` interleaves two kinds of
work. While events are scheduled at the current instant, it processes them as simpy does; agents
that ask the LLM during that instant only queue their requests. When the instant has nothing left
to run and requests are in flight, it runs one engine iteration instead of advancing the clock.
Requests finishing in that iteration succeed their events at the same instant, the agents they
wake may ask again, and those new requests join the running batch at the next iteration. LLM calls
therefore take zero simulated time, and every call of one instant is batched together.

With a :attr:`SimEnvironment.replay` (:mod:`scalesim.replay`), a call that matches an earlier
run's record is answered from it instead: it waits, without the engine, for the iteration that
finished it in the recorded run, so the agents resume in the order they did then.

The environment always has an *observer* (:class:`SimObserver`): agents report what they block
on and the environment reports calls to it. A run's observer is the
:class:`~scalesim.distance.DistanceOracle`; without one it is a :class:`NullObserver`, so no
caller has to ask whether there is one. Turn orders (:mod:`scalesim.turns`) register on the
environment, where the oracle reads them.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import simpy

from runtime import Completion, Request, RequestError
from runtime.interface import EngineInterface
from runtime.replicas import ReplicaFailure

if TYPE_CHECKING:
    from scalesim.replay import RecordedCall, Replay
    from scalesim.turns import TurnOrder


class LLMCall(simpy.Event):
    """The event an agent yields on to wait for its LLM reply.

    Its value is the :class:`~runtime.Completion`. If the request fails, the event fails with a
    :class:`~runtime.RequestError`, raised inside the waiting agent's process.
    """

    def __init__(self, env: "SimEnvironment", agent_id: str, request: Request) -> None:
        super().__init__(env)
        self.agent_id = agent_id
        self.request = request
        self.submit_time = env.now
        self.predicted_rank: int | None = None
        #: this call's place in its agent's sequence of calls (0 for its first)
        self.position = 0
        #: the environment's engine iteration in which it finished (set when it does)
        self.iteration = 0
        #: answered from an earlier run's record (:mod:`scalesim.replay`), not by the engine
        self.replayed = False


class SimObserver(Protocol):
    """What the environment and the agents tell about who will call the LLM next."""

    def on_submit(self, agent: str) -> int | None:
        """``agent`` issued a call now; returns its predicted rank, if one was predicted."""

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

    def on_submit(self, agent: str) -> int | None:
        return None

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


class SimEnvironment(simpy.Environment):
    """A simpy environment whose idle instants are spent running the LLM engine.

    ``observer`` builds the run's :class:`SimObserver` from the environment (for instance
    ``lambda env: DistanceOracle(env)``); by default nothing is observed. ``engine`` may be
    ``None`` and :meth:`attach`\ ed later: a run sets its world up before the model loads.
    """

    def __init__(self, engine: EngineInterface | None, initial_time: float = 0, *,
                 observer: Callable[["SimEnvironment"], SimObserver] | None = None) -> None:
        super().__init__(initial_time)
        self._engine = engine
        #: homes given before the engine was attached (applied by :meth:`attach`)
        self._placed: dict[str, int] = {}
        self.in_flight: dict[int, LLMCall] = {}
        #: Called with ``(call, completion)`` for every finished call, before the agent resumes.
        self.completion_listeners: list[Callable[[LLMCall, Completion], None]] = []
        #: Called with the agent id of every submitted call (e.g. a recorded-future distance).
        self.submit_listeners: list[Callable[[str], None]] = []
        #: The :class:`~scalesim.turns.TurnOrder` objects created on this environment.
        self.turn_orders: list[TurnOrder] = []
        self.observer: SimObserver = observer(self) if observer is not None else NullObserver()
        #: answers calls from an earlier run's record, where it matches (None: the engine all)
        self.replay: Replay | None = None
        #: engine iterations run so far (replayed ones counted where the record ran them)
        self.iterations = 0
        self._positions: dict[str, int] = {}
        #: calls answered from the record, waiting for their iteration; keyed as in_flight
        self._answered: dict[int, RecordedCall] = {}

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

    def submit(self, agent_id: str, request: Request) -> LLMCall:
        """Hand ``request`` to the engine now (or answer it from :attr:`replay`'s record) and
        return the event of its reply."""
        call = LLMCall(self, agent_id, request)
        call.position = self._positions.get(agent_id, 0)
        self._positions[agent_id] = call.position + 1
        call.predicted_rank = self.observer.on_submit(agent_id)
        for listener in self.submit_listeners:
            listener(agent_id)
        recorded = (self.replay.answer(agent_id, call.position, request, self.now)
                    if self.replay is not None else None)
        if recorded is not None:
            call.replayed = True
            key = -self.replay.replayed  # type: ignore[union-attr]  # never an engine's id
            self._answered[key] = recorded
            self.in_flight[key] = call
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

    def step(self) -> None:
        if self.in_flight and self.peek() > self.now:
            self._run_engine_iteration()
            return
        before = self._now
        try:
            super().step()
        finally:  # also when the step ends the run (simpy raises StopSimulation)
            if self._now != before:
                self.observer.on_advance()

    def _run_engine_iteration(self) -> None:
        self.observer.checkpoint()
        self.iterations += 1
        if self._answered:
            self._deliver_answered(live=len(self.in_flight) > len(self._answered))
            if len(self.in_flight) == len(self._answered):  # no live call: no engine step
                return
        try:
            completions = self.engine.step().finished
        except ReplicaFailure as failure:  # the requests of a dead replica fail, then the run
            self._complete(failure.completions)
            raise
        self._complete(completions)

    def _deliver_answered(self, live: bool) -> None:
        """Finish recorded answers: the group of the earliest recorded iteration, in recorded
        order, as that iteration finished them (so agents resume as they did live); all of
        them when live calls run beside them (the trajectory has left the record by then)."""
        first = min(r.iteration for r in self._answered.values())
        if not live:
            self.iterations = max(self.iterations, first)
        due = sorted((r.row, key) for key, r in self._answered.items()
                     if live or r.iteration == first)
        wall = time.perf_counter()
        for _, key in due:
            recorded = self._answered.pop(key)
            self._finish(self.in_flight.pop(key), recorded.completion(recorded.request_id, wall))

    def _complete(self, completions: list[Completion]) -> None:
        for completion in completions:
            self._finish(self.in_flight.pop(completion.request_id), completion)

    def _finish(self, call: LLMCall, completion: Completion) -> None:
        call.iteration = self.iterations
        self.observer.on_finish(call.agent_id)
        for listener in self.completion_listeners:
            listener(call, completion)
        if completion.ok:
            call.succeed(completion)
        else:
            call.fail(RequestError(completion.error))
