"""The simulation clock that drives the serving engine.

:class:`SimEnvironment` is a :class:`simpy.Environment` whose :meth:`step` interleaves two kinds of
work. While events are scheduled at the current instant, it processes them as simpy does; agents
that ask the LLM during that instant only queue their requests. When the instant has nothing left
to run and requests are in flight, it runs one engine iteration instead of advancing the clock.
Requests finishing in that iteration succeed their events at the same instant, the agents they
wake may ask again, and those new requests join the running batch at the next iteration. LLM calls
therefore take zero simulated time, and every call of one instant is batched together.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import simpy

from runtime import Completion, Engine, Request, RequestError


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
    """A simpy environment whose idle instants are spent running the LLM engine."""

    def __init__(self, engine: Engine, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.engine = engine
        self.in_flight: dict[int, LLMCall] = {}
        #: Called with ``(call, completion)`` for every finished call, before the agent resumes.
        self.completion_listeners: list[Callable[[LLMCall, Completion], None]] = []
        #: Called with the agent id of every submitted call (e.g. a recorded-future distance).
        self.submit_listeners: list[Callable[[str], None]] = []
        #: The run's :class:`~scalesim.distance.DistanceOracle`; agents report what they block on.
        self.oracle: Any = None

    def submit(self, agent_id: str, request: Request) -> LLMCall:
        """Hand ``request`` to the engine now and return the event of its reply."""
        call = LLMCall(self, agent_id, request)
        if self.oracle is not None:
            call.predicted_rank = self.oracle.on_submit(agent_id)
        for listener in self.submit_listeners:
            listener(agent_id)
        self.in_flight[self.engine.submit(request)] = call
        return call

    def run(self, until: Any = None) -> Any:
        """Run as :meth:`simpy.Environment.run` does, with :func:`relaxed_gc`."""
        with relaxed_gc():
            return super().run(until)

    def step(self) -> None:
        if self.in_flight and self.peek() > self.now:
            self._run_engine_iteration()
        else:
            super().step()

    def _run_engine_iteration(self) -> None:
        if self.oracle is not None:
            self.oracle.checkpoint()
        for completion in self.engine.step():
            call = self.in_flight.pop(completion.request_id)
            if self.oracle is not None:
                self.oracle.on_finish(call.agent_id)
            for listener in self.completion_listeners:
                listener(call, completion)
            if completion.ok:
                call.succeed(completion)
            else:
                call.fail(RequestError(completion.error))

    def pending_calls(self) -> int:
        return len(self.in_flight)


