"""A deterministic stand-in for :class:`runtime.Engine`, for fast tests of world logic.

It implements :class:`runtime.interface.EngineInterface` with no model and no agent memory, and
answers each request with a canned reply: ``reply(request)`` when a function is
given, else the next string of a cycling list. Every request is kept in :attr:`requests`, and
the simulated time it was submitted at in :attr:`times` (once :attr:`env` is set).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable

from runtime import Completion, Request
from runtime.interface import EngineListener, StepResult, WallClock
from runtime.memory import DistanceSource
from scalesim import SimEnvironment


class FakeEngine:
    """Finishes every submitted request at the next :meth:`step`."""

    max_context = 1 << 20
    policy_name = "none"
    uses_distance = False

    def __init__(self, reply: Callable[[Request], str] | Iterable[str] = ("ok",)) -> None:
        if callable(reply):
            self._reply = reply
        else:
            texts = itertools.cycle(list(reply))
            self._reply = lambda request: next(texts)
        self._ids = itertools.count()
        self._queue: list[Request] = []
        self.requests: list[Request] = []
        self.times: list[float] = []
        self.env: SimEnvironment | None = None
        self.closed = False
        self.clock = WallClock()
        #: what was declared, in order: ``(agent_id, prefix, adapter)``
        self.declared: list[tuple[str, str, str | None]] = []
        self.distance: DistanceSource | None = None
        #: what the front end asked of it: homes given by ``place``, listeners, idle ticks
        self.placed: dict[str, int] = {}
        self.listeners: list[EngineListener] = []
        self.ticks = 0
        self._cancelled: list[Completion] = []

    def prompt_tokens(self, prefix: str, prompt: str, history: Any = ()) -> int:
        return len(prefix.split()) + len(prompt.split()) + sum(
            len(str(turn.get("content") or "").split()) for turn in history)

    def architecture(self) -> None:
        return None

    def declare(self, agent_id: str, prefix: str, adapter: str | None = None) -> None:
        self.declared.append((agent_id, prefix, adapter))

    def use_distance(self, source: DistanceSource,
                     clock: Callable[[], float] | None = None) -> None:
        self.distance = source

    def place(self, agent_id: str, replica: int) -> None:
        self.placed[agent_id] = replica

    def listen(self, listener: EngineListener) -> None:
        self.listeners.append(listener)

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """Fail a queued request at the next :meth:`step`."""
        for request in self._queue:
            if request.request_id == request_id:
                self._queue.remove(request)
                now = time.perf_counter()
                self._cancelled.append(Completion(request_id, request.agent_id, "", 0, 0, 0,
                                                  "error", now, None, now, error=reason))
                return True
        return False

    def tick(self) -> None:
        self.ticks += 1

    def submit(self, request: Request) -> int:
        request.request_id = next(self._ids)
        self._queue.append(request)
        self.requests.append(request)
        if self.env is not None:
            self.times.append(self.env.now)
        return request.request_id

    def has_work(self) -> bool:
        return bool(self._queue or self._cancelled)

    def report(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.closed = True

    def step(self) -> StepResult:
        done, self._queue = self._queue, []
        cancelled, self._cancelled = self._cancelled, []
        now = time.perf_counter()
        return StepResult(cancelled + [Completion(r.request_id, r.agent_id, self._reply(r),
                                                  len(r.prompt.split()), 0, 1, "stop", now, now,
                                                  now) for r in done], batch=len(done),
                          steps=1 if done else 0, tokens=len(done))


def run_world(world_cls: type, params: dict[str, Any], until: float | None,
              reply: Callable[[Request], str] | Iterable[str] = ("ok",), seed: int = 0):
    """Build ``world_cls`` on a :class:`FakeEngine`, run it to ``until``; return (world, engine)."""
    engine = FakeEngine(reply)
    env = SimEnvironment(engine)
    engine.env = env
    world = world_cls(env, seed=seed)
    world.setup(**params)
    env.run(until=until)
    return world, engine
