"""One engine replica: an :class:`~runtime.engine.Engine` with its own memory manager and
budgets, driven by one batched call per iteration.

:class:`EngineReplica` is the same object in-process (``cluster: local``) and inside a Ray actor
(``cluster: ray``, :mod:`runtime.ray_replica`): the driver sends it a :class:`ReplicaBatch` (the
new requests of its agents, the driver's clock and the distance changes of its agents as two
arrays) and gets back a :class:`ReplicaResult` (the completions of one engine iteration). Its
memory manager reads the distances from a :class:`~runtime.replica_distances.ReplicaDistances`.
The engine is built inside the replica from a picklable zero-argument ``build`` callable
(e.g. ``functools.partial(build_engine, "modeled", ...)``), so an actor loads its own model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtime.engine import Engine
from runtime.replica_distances import ReplicaDistances
from runtime.request import Completion, Request


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


@dataclass
class ReplicaResult:
    """What a replica answers: the completions of its iteration and what the step cost."""

    completions: list[Completion]
    has_work: bool
    #: wall seconds the replica spent in its engine iteration
    busy_s: float
    #: how far the modeled executor's clock moved in it (``None``: not a modeled engine)
    modeled_s: float | None = None


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
        manager = self.engine.memory
        self.uses_distance = manager is not None and manager.policy.uses_distance
        if manager is not None:
            manager.use_distance(self.distances)

    def _modeled_clock(self) -> float | None:
        # The modeled executor exposes its virtual clock as ``now``; the others have none.
        now = getattr(self.engine.executor, "now", None)
        return float(now) if isinstance(now, (int, float)) else None

    def step(self, batch: ReplicaBatch) -> ReplicaResult:
        """Apply the distance changes, queue the new requests and run one engine iteration."""
        start = time.perf_counter()
        wait_until = getattr(self.engine.executor, "wait_until", None)
        if batch.modeled_now is not None and wait_until is not None:
            wait_until(batch.modeled_now)
        before = self._modeled_clock()
        if len(batch.agents):
            self.distances.update(batch.now, batch.agents, batch.keys)
        else:
            self.distances.now = batch.now
        for request in batch.requests:
            self.distances.on_submit(request.agent_id)
            self.engine.submit(request)
        completions = self.engine.step() if self.engine.has_work() else []
        for completion in completions:
            self.distances.on_finish(completion.agent_id)
        after = self._modeled_clock()
        modeled = after - before if after is not None and before is not None else None
        return ReplicaResult(completions, self.engine.has_work(), time.perf_counter() - start,
                             modeled)

    def report(self) -> dict[str, Any]:
        """The engine's ``summary.json`` sections and the memory manager's hit and miss counts."""
        manager = self.engine.memory
        totals = manager.totals if manager is not None else None
        return {"sections": self.engine.report(),
                "totals": {"hits": totals.hits, "misses": totals.misses} if totals else {}}

    def describe(self) -> dict[str, Any]:
        """What the driver needs to know once: does the policy read distances?"""
        return {"index": self.index, "uses_distance": self.uses_distance}

    def close(self) -> None:
        self.engine.close()
