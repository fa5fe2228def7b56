"""One engine replica: an :class:`~runtime.engine.Engine` with its own memory manager and
budgets, driven by one batched call per iteration.

:class:`EngineReplica` is the same object in-process (``cluster: local``) and inside a Ray actor
(``cluster: ray``, :mod:`runtime.ray_replica`): the driver sends it a :class:`ReplicaBatch` (the
new requests of its agents, the driver's clock and the distance changes of its agents as two
arrays, agents declared, requests cancelled) and gets back a :class:`ReplicaResult` (the
:class:`~runtime.interface.StepResult` of one engine iteration and, when the driver listens, the
engine's events). Its
memory manager reads the distances from a :class:`~runtime.replica_distances.ReplicaDistances`.
The engine is built inside the replica from a picklable zero-argument ``build`` callable
(e.g. ``functools.partial(build_engine, "modeled", ...)``), so an actor loads its own model.
"""

from __future__ import annotations

import dataclasses
import time
from collections import abc
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtime.engine import Engine
from runtime.interface import EngineEvent, StepResult, StepTimed
from runtime.replica_distances import ReplicaDistances
from runtime.request import Request, Turn


@dataclass
class ReplicaBatch:
    """What the driver sends a replica in one iteration."""

    now: float
    requests: list[Request] = field(default_factory=list)
    #: agents whose order key changed, and their keys (``keys[i]`` belongs to ``agents[i]``)
    agents: list[str] = field(default_factory=list)
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    #: modeled engines: the lockstep time the iteration starts at (all replicas wait for the
    #: slowest one; ``None``: not modeled)
    modeled_now: float | None = None
    #: agents declared since the last call: ``(agent_id, prefix, adapter)``
    declares: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: requests to cancel: ``(request_id, reason)``
    cancels: list[tuple[int, str]] = field(default_factory=list)
    #: run an engine iteration (``False``: only apply the rest and tick, while idle)
    step: bool = True


@dataclass
class ReplicaResult:
    """What a replica answers: its iteration's result and what the step cost."""

    result: StepResult
    has_work: bool
    #: wall seconds the replica spent in its engine iteration
    busy_s: float
    #: the engine events of the call, when the driver listens (:meth:`EngineReplica.listen`)
    events: list[EngineEvent] = field(default_factory=list)


class ReplicaDied(Exception):
    """A replica is gone (what a cluster returns for it instead of a :class:`ReplicaResult`)."""

    def __init__(self, replica: int, reason: str) -> None:
        super().__init__(f"replica {replica} died: {reason}")
        self.replica = replica


class EngineReplica:
    """An engine and the distances of its agents, stepped by :meth:`step` (module doc)."""

    def __init__(self, index: int, build: Callable[[], Engine]) -> None:
        self.index = index
        self.engine = build()
        self.distances = ReplicaDistances()
        self.engine.use_distance(self.distances)
        self._events: list[EngineEvent] | None = None

    def listen(self) -> None:
        """Collect the engine's events from now on; each :meth:`step` returns them."""
        if self._events is None:
            self._events = []
            self.engine.listen(self._collect)

    def _collect(self, event: EngineEvent) -> None:
        assert self._events is not None
        if isinstance(event, StepTimed):
            event = dataclasses.replace(event, replica=self.index)
        self._events.append(event)

    def step(self, batch: ReplicaBatch) -> ReplicaResult:
        """Apply the batch (distances, declarations, requests, cancellations) and run one
        engine iteration (or, for ``batch.step=False``, the idle housekeeping)."""
        start = time.perf_counter()
        engine = self.engine
        clock = engine.clock
        if batch.modeled_now is not None:
            clock.wait_until(batch.modeled_now)
        # The modeled time of the whole call: declarations and submissions may move the clock.
        modeled_from = clock.now() if clock.modeled else None
        if len(batch.agents):
            self.distances.update(batch.now, batch.agents, batch.keys)
        else:
            self.distances.now = batch.now
        for agent_id, prefix, adapter in batch.declares:
            engine.declare(agent_id, prefix, adapter)
        for request in batch.requests:
            self.distances.on_submit(request.agent_id)
            engine.submit(request)
        for request_id, reason in batch.cancels:
            engine.cancel(request_id, reason)
        if batch.step and engine.has_work():
            result = engine.step()
        else:
            if not batch.step:
                engine.tick()
            result = StepResult()
        if modeled_from is not None:
            result.modeled_s = clock.now() - modeled_from
        for completion in result.finished:
            self.distances.on_finish(completion.agent_id)
        events: list[EngineEvent] = []
        if self._events:
            events, self._events = self._events, []
        return ReplicaResult(result, engine.has_work(), time.perf_counter() - start, events)

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        return self.engine.encode(prefix, prompt, history)

    def report(self) -> dict[str, Any]:
        """The engine's ``summary.json`` sections and the memory manager's hit and miss counts."""
        totals = self.engine.memory.totals
        return {"sections": self.engine.report(),
                "totals": {"hits": totals.hits, "misses": totals.misses}}

    def describe(self) -> dict[str, Any]:
        """What the driver needs to know once: the engine's constants."""
        engine = self.engine
        return {"index": self.index, "uses_distance": engine.uses_distance,
                "policy": engine.policy_name, "modeled": engine.clock.modeled,
                "max_context": engine.max_context, "architecture": engine.architecture(),
                "structured_output": engine.structured_output}

    def close(self) -> None:
        self.engine.close()
