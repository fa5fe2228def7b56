"""Engine replicas behind the engine interface: the driver loop, affinity, faults, the summary.

A :class:`ReplicaSet` is what a simulation or a server drives when ``runtime.replicas`` is more
than one (or ``runtime.cluster`` is ``ray``). It is an :class:`~runtime.interface.EngineInterface`:
front ends submit, cancel, declare, listen and step it exactly as they would one engine. Behind it, each
replica (:class:`~runtime.replica.EngineReplica`) owns an engine with its own memory manager and
budgets; a *cluster* runs them, in-process (:class:`LocalCluster`) or as Ray actors
(:class:`runtime.ray_replica.RayCluster`).

**Affinity.** :meth:`ReplicaSet.submit` gives the request a run-wide request id and queues it
for the agent's home replica (:class:`~runtime.affinity.Affinity`).

**Driver loop.** One :meth:`ReplicaSet.step` is one iteration: every replica with work or new
requests gets one batched call (its new requests, declarations and cancellations, the driver's
clock and the distance changes of its agents as arrays, from the
:class:`~runtime.replica_distances.DistanceFeed`); the calls
run concurrently on Ray; the completions of all replicas are returned in request-id order, so a
seeded run is deterministic and, with greedy decoding, gives every call the reply one engine
would.

**Faults.** A replica that dies (a Ray actor killed, its node lost) fails every request it had
in flight with an error naming it. With ``on_failure="fail"`` (the default) :meth:`step` then
raises :class:`ReplicaFailure`, which carries those failed completions so the caller can hand
them to the waiting agents before it stops the run. With ``"continue"`` the failed completions
are returned like any others, the dead replica's agents move to live replicas and the run goes
on; only when no replica is left does :meth:`step` raise.

**Summary.** :meth:`ReplicaSet.report` adds a ``replicas`` section (per replica: agents, calls,
hit rate, bytes loaded, stall; the imbalance ``max/mean`` calls; the driver's own time per
iteration) to the engine sections, whose ``memory`` and ``modeled`` totals are summed over the
replicas. The modeled makespan of a replica set is the sum over iterations of the slowest
replica's modeled step: the replicas step in lockstep, one iteration at a time, and a modeled
replica idles (its copy link still busy) until that time before its next step.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections import abc
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from runtime.affinity import Affinity
from runtime.engine import Engine
from runtime.interface import EngineClock, EngineListener, StepResult, WallClock
from runtime.memory.distance import DistanceSource, OrderedDistanceSource
from runtime.model.profiles import ModelConfig
from runtime.replica import EngineReplica, ReplicaBatch, ReplicaDied, ReplicaResult
from runtime.replica_distances import DistanceFeed
from runtime.request import Completion, Request, RequestError, Turn

if TYPE_CHECKING:  # torch is imported only where embeddings are made
    from runtime.embedding import EmbeddingPass

OnFailure = Literal["fail", "continue"]
CLUSTERS = ("local", "ray")


class ReplicaFailure(RuntimeError):
    """The run cannot go on after a replica died; ``completions`` are the requests it failed."""

    def __init__(self, message: str, completions: list[Completion]) -> None:
        super().__init__(message)
        self.completions = completions


class Cluster(Protocol):
    """Where the replicas run: :class:`LocalCluster` or :class:`runtime.ray_replica.RayCluster`."""

    name: str

    def size(self) -> int: ...

    def describe(self) -> list[dict[str, Any]]: ...

    def listen(self) -> None:
        """Make every replica return its engine's events with its results."""

    def dispatch(self, batches: dict[int, ReplicaBatch]) -> dict[int, ReplicaResult | ReplicaDied]:
        """Send each replica its batch; return its result, or :class:`ReplicaDied`."""

    def encode(self, replica: int, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """A request's ids as replica ``replica`` tokenizes it (from any thread)."""

    def report(self, replica: int) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalCluster:
    """Replicas in this process, stepped one after the other (tests, the modeled executor)."""

    name = "local"

    def __init__(self, replicas: int, build: Callable[[], Engine]) -> None:
        self.replicas = [EngineReplica(i, build) for i in range(replicas)]

    def size(self) -> int:
        return len(self.replicas)

    def describe(self) -> list[dict[str, Any]]:
        return [replica.describe() for replica in self.replicas]

    def listen(self) -> None:
        for replica in self.replicas:
            replica.listen()

    def dispatch(self, batches: dict[int, ReplicaBatch]) -> dict[int, ReplicaResult | ReplicaDied]:
        return {i: self.replicas[i].step(batch) for i, batch in batches.items()}

    def encode(self, replica: int, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        return self.replicas[replica].encode(prefix, prompt, history)

    def report(self, replica: int) -> dict[str, Any]:
        return self.replicas[replica].report()

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


class _ReplicaState:
    """What the driver knows of one replica: its queue, what it has in flight, its counts."""

    def __init__(self) -> None:
        self.outbox: list[Request] = []
        self.declares: list[tuple[str, str, str | None]] = []
        self.cancels: list[tuple[int, str]] = []
        self.in_flight: dict[int, Request] = {}
        self.has_work = False
        self.dead: str | None = None
        self.calls = 0
        self.hits = 0
        self.misses = 0
        self.bytes_loaded = 0
        self.stall_s = 0.0
        self.iterations = 0
        self.busy_s = 0.0
        self.agents: set[str] = set()

    def has_news(self) -> bool:
        """Whether the replica has something to be told or to do."""
        return self.dead is None and bool(self.outbox or self.has_work or self.declares
                                          or self.cancels)


class _LockstepClock:
    """A replica set's clock: the modeled makespan of its lockstep iterations, or wall time."""

    def __init__(self, replicas: "ReplicaSet", modeled: bool) -> None:
        self._replicas = replicas
        self.modeled = modeled
        self._wall = WallClock()

    def now(self) -> float:
        return self._replicas.modeled_makespan_s if self.modeled else self._wall.now()

    def wait_until(self, t: float) -> None:
        if self.modeled:
            self._replicas.modeled_makespan_s = max(self._replicas.modeled_makespan_s, t)


class ReplicaSet:
    """Several engine replicas driven as one engine (see the module docstring)."""

    def __init__(self, cluster: Cluster, *, on_failure: OnFailure = "fail") -> None:
        if on_failure not in ("fail", "continue"):
            raise ValueError(f"on_failure must be 'fail' or 'continue', got {on_failure!r}")
        self.cluster = cluster
        self.on_failure = on_failure
        self.affinity = Affinity(cluster.size())
        self._state = [_ReplicaState() for _ in range(cluster.size())]
        self._ids = itertools.count()
        #: the distance changes waiting for each replica (``None``: no policy reads distances)
        self.feed: DistanceFeed | None = None
        self._source_clock: Callable[[], float] = lambda: 0.0
        described = cluster.describe()
        self._described = described[0]
        self._uses_distance = any(d["uses_distance"] for d in described)
        self._modeled = bool(self._described["modeled"])
        self._clock = _LockstepClock(self, self._modeled)
        self._listeners: list[EngineListener] = []
        #: requests failed by the driver itself (cancelled before they reached their replica)
        self._failed: list[Completion] = []
        #: requests failed by a replica that died while the set was idle (:meth:`tick`)
        self._died: list[Completion] = []
        self.iterations = 0
        self.driver_s = 0.0
        #: agent distances sent to the replicas, over the run
        self.distance_updates = 0
        #: the modeled makespan of the set: per iteration, the slowest replica's modeled step
        self.modeled_makespan_s = 0.0

    # -- what the engine is --------------------------------------------------------------------

    @property
    def replicas(self) -> int:
        return len(self._state)

    @property
    def clock(self) -> EngineClock:
        return self._clock

    @property
    def max_context(self) -> int:
        return int(self._described["max_context"])

    @property
    def structured_output(self) -> bool:
        return bool(self._described.get("structured_output", False))

    @property
    def embeddings(self) -> bool:
        return False  # see embedding()

    @property
    def policy_name(self) -> str:
        return str(self._described["policy"])

    @property
    def uses_distance(self) -> bool:
        return self._uses_distance

    def architecture(self) -> ModelConfig | None:
        found: ModelConfig | None = self._described["architecture"]
        return found

    def embedding(self, input: str | list[int]) -> EmbeddingPass:
        """Not across replicas: a pass holds its model's tensors, and a replica may live in
        another process."""
        raise RequestError("embeddings are served by a single engine (runtime.replicas: 1)")

    def prompt_tokens(self, prefix: str, prompt: str, history: abc.Sequence[Turn] = ()) -> int:
        prefix_ids, prompt_ids = self.encode(prefix, prompt, history)
        return len(prefix_ids) + len(prompt_ids)

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """Tokenized by the first live replica (every replica has the same model); the ids
        travel with the request to its home replica."""
        live = next((i for i, s in enumerate(self._state) if s.dead is None), 0)
        return self.cluster.encode(live, prefix, prompt, history)

    # -- what goes in --------------------------------------------------------------------------

    def place(self, agent_id: str, replica: int) -> None:
        """Make ``replica`` the home of ``agent_id`` (see :class:`~runtime.affinity.Affinity`)."""
        self.affinity.place(agent_id, replica)

    def home(self, agent_id: str) -> int:
        return self.affinity.home(agent_id)

    def use_distance(self, source: DistanceSource,
                     clock: Callable[[], float] | None = None) -> None:
        """Feed each replica the distances of its agents from ``source``; ``clock`` gives the
        current time on the source's scale (the simulation's ``now``)."""
        if clock is not None:
            self._source_clock = clock
        if not self._uses_distance:
            return
        if not isinstance(source, OrderedDistanceSource):
            raise ValueError("engine replicas need a watchable distance source "
                             "(runtime.memory.OrderedDistanceSource) for a distance policy")
        self.feed = DistanceFeed(source, self.affinity.home, self.replicas)

    def listen(self, listener: EngineListener) -> None:
        """Call ``listener`` with every replica's events (after each iteration that made them;
        a :class:`~runtime.interface.StepTimed` names its replica)."""
        if not self._listeners:
            self.cluster.listen()
        self._listeners.append(listener)

    def declare(self, agent_id: str, prefix: str, adapter: str | None = None) -> None:
        """Declare ``agent_id`` to its home replica (sent with that replica's next call)."""
        self._state[self.affinity.home(agent_id)].declares.append((agent_id, prefix, adapter))

    def submit(self, request: Request) -> int:
        """Queue ``request`` for its agent's home replica; a request without an id gets a
        run-wide one."""
        if request.request_id < 0:
            request.request_id = next(self._ids)
        home = self.affinity.home(request.agent_id)
        state = self._state[home]
        state.outbox.append(request)
        state.in_flight[request.request_id] = request
        state.agents.add(request.agent_id)
        return request.request_id

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """Fail a request: at once if it has not left the driver, else on its replica."""
        for state in self._state:
            request = state.in_flight.get(request_id)
            if request is None or state.dead is not None:
                continue
            # By identity: requests are dataclasses, and two alike would compare equal.
            queued = next((i for i, r in enumerate(state.outbox) if r is request), None)
            if queued is not None:
                del state.outbox[queued]
                del state.in_flight[request_id]
                now = time.perf_counter()
                self._failed.append(Completion(request_id, request.agent_id, "", 0, 0, 0,
                                               "error", now, None, now, error=reason))
            else:
                state.cancels.append((request_id, reason))
            return True
        return False

    def has_work(self) -> bool:
        return bool(self._failed or self._died) or any(s.outbox or s.has_work for s in self._state
                                         if s.dead is None)

    # -- iterations ----------------------------------------------------------------------------

    def _batches(self, *, step: bool) -> dict[int, ReplicaBatch]:
        now = self._source_clock()
        batches: dict[int, ReplicaBatch] = {}
        for i, state in enumerate(self._state):
            if state.dead is not None or (step and not state.has_news()):
                continue
            agents, keys = self.feed.take(i) if self.feed is not None else ([], None)
            self.distance_updates += len(agents)
            batch = ReplicaBatch(now, state.outbox, agents,
                                 modeled_now=self.modeled_makespan_s if self._modeled else None,
                                 declares=state.declares, cancels=state.cancels, step=step)
            if keys is not None:
                batch.keys = keys
            batches[i] = batch
            state.outbox, state.declares, state.cancels = [], [], []
        return batches

    def tick(self) -> None:
        """While idle: every live replica takes its news and does its memory housekeeping."""
        results = self.cluster.dispatch(self._batches(step=False))
        for i, result in sorted(results.items()):
            if isinstance(result, ReplicaDied):
                self._died += self._fail_replica(i, str(result))
            else:
                self._state[i].has_work = result.has_work
                self._emit(result)

    def step(self) -> StepResult:
        """One iteration of every replica with something to do (see the module docstring)."""
        start = time.perf_counter()
        results = self.cluster.dispatch(self._batches(step=True))
        out = StepResult()
        failed, self._failed = self._failed, []
        died, self._died = self._died, []
        slowest_modeled = 0.0
        busiest = 0.0
        for i, result in sorted(results.items()):
            state = self._state[i]
            if isinstance(result, ReplicaDied):
                died += self._fail_replica(i, str(result))
                continue
            step = result.result
            state.has_work = result.has_work
            state.iterations += 1
            state.busy_s += result.busy_s
            busiest = max(busiest, result.busy_s)
            if step.modeled_s is not None:
                slowest_modeled = max(slowest_modeled, step.modeled_s)
            for completion in step.finished:
                state.in_flight.pop(completion.request_id, None)
                state.calls += 1
                stats = completion.memory
                state.hits += sum(stats.hits.values())
                state.misses += sum(stats.misses.values())
                state.bytes_loaded += stats.bytes_loaded
                state.stall_s += stats.stall_s
            out.finished += step.finished
            out.partial.update(step.partial)
            out.batch += step.batch
            out.tokens += step.tokens
            out.steps = max(out.steps, step.steps)  # in lockstep: the longest replica's run
            out.waiting += step.waiting
            out.running += step.running
            self._emit(result)
        self.iterations += 1
        self.modeled_makespan_s += slowest_modeled
        if self._modeled:
            out.modeled_s = slowest_modeled
        out.finished += failed + died
        out.finished.sort(key=lambda c: c.request_id)
        # On Ray the replicas step concurrently: the driver's own share is what the slowest
        # replica's step does not cover (in-process, the steps add up instead).
        spent = time.perf_counter() - start
        self.driver_s += spent - (busiest if self.cluster.name == "ray" else
                                  sum(r.busy_s for r in results.values()
                                      if isinstance(r, ReplicaResult)))
        if died and (self.on_failure == "fail" or not self.affinity.live):
            dead = [i for i, s in enumerate(self._state) if s.dead is not None]
            reason = next(s.dead for s in self._state if s.dead is not None)
            raise ReplicaFailure(
                f"{reason}; {len(died)} requests in flight there failed "
                f"(runtime.on_replica_failure={self.on_failure}, dead replicas: {dead})",
                out.finished)
        return out

    def _emit(self, result: ReplicaResult) -> None:
        for event in result.events:
            for listener in self._listeners:
                listener(event)

    def _fail_replica(self, replica: int, reason: str) -> list[Completion]:
        """Replica ``replica`` died: fail its requests in flight; move its agents (continue)."""
        state = self._state[replica]
        state.dead = reason
        now = time.perf_counter()
        failed = [Completion(rid, req.agent_id, "", 0, 0, 0, "error", now, None, now,
                             error=f"{reason} (request {rid} of agent {req.agent_id!r})")
                  for rid, req in sorted(state.in_flight.items())]
        state.in_flight.clear()
        state.has_work = False
        if len(self.affinity.live) > 1:
            self.affinity.fail_over(replica)
            if self.feed is not None:  # the new homes need these agents' distances
                self.feed.reassign(sorted(state.agents))
            state.agents.clear()
        else:
            self.affinity.live.clear()
        return failed

    # -- the summary ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The engine sections summed over the replicas, and the ``replicas`` section."""
        reports = [self.cluster.report(i) if s.dead is None else None
                   for i, s in enumerate(self._state)]
        per_replica = []
        for i, (state, rep) in enumerate(zip(self._state, reports)):
            accesses = state.hits + state.misses
            row: dict[str, Any] = {
                "replica": i, "agents": len(state.agents), "calls": state.calls,
                "hit_rate": round(state.hits / accesses, 4) if accesses else None,
                "bytes_loaded": int(state.bytes_loaded), "stall_s": round(state.stall_s, 4),
                "iterations": state.iterations, "busy_s": round(state.busy_s, 4),
                "dead": state.dead}
            modeled = (rep or {}).get("sections", {}).get("modeled")
            if modeled:
                row["modeled_makespan_s"] = modeled["modeled_makespan_s"]
            per_replica.append(row)
        calls = [s.calls for s in self._state]
        mean = sum(calls) / len(calls)
        section: dict[str, Any] = {
            "count": self.replicas, "cluster": self.cluster.name,
            "on_failure": self.on_failure, "iterations": self.iterations,
            "imbalance": round(max(calls) / mean, 4) if mean else None,
            "driver_overhead_ms": round(1000 * self.driver_s / self.iterations, 4)
            if self.iterations else None,
            "distance_updates_per_iteration": round(self.distance_updates / self.iterations, 1)
            if self.iterations else None,
            "moved_agents": len(self.affinity.moved), "per_replica": per_replica}
        out = _sum_sections([r["sections"] for r in reports if r is not None],
                            [r["totals"] for r in reports if r is not None])
        if self._modeled and "modeled" in out:
            out["modeled"]["modeled_makespan_s"] = self.modeled_makespan_s
            out["modeled"]["replica_makespan_s"] = [r.get("modeled_makespan_s")
                                                    for r in per_replica]
        out["replicas"] = section
        return out

    def close(self) -> None:
        self.cluster.close()


def _sum_sections(sections: list[dict[str, Any]], totals: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the replicas' sections: numbers are summed, the rest is the first replica's."""
    out: dict[str, Any] = {}
    for report in sections:
        for name, section in report.items():
            if not isinstance(section, dict):
                out.setdefault(name, section)
                continue
            merged = out.setdefault(name, {})
            for key, value in section.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key in merged and key not in ("device_bytes", "hit_rate"):
                    merged[key] += value
                else:
                    merged.setdefault(key, value)
    hits = sum(t.get("hits", 0) for t in totals)
    accesses = hits + sum(t.get("misses", 0) for t in totals)
    if "memory" in out:
        out["memory"]["hit_rate"] = round(hits / accesses, 4) if accesses else None
    return out


def build_replicas(replicas: int, build: Callable[[], Engine], *, cluster: str = "local",
                   on_failure: OnFailure = "fail", ray_address: str | None = None,
                   num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0,
                   placement_strategy: str = "PACK") -> ReplicaSet:
    """``replicas`` engines built by ``build`` (a picklable zero-argument callable), run by
    ``cluster`` (``local`` or ``ray``), behind one :class:`ReplicaSet`."""
    if cluster == "local":
        return ReplicaSet(LocalCluster(replicas, build), on_failure=on_failure)
    if cluster == "ray":
        from runtime.ray_replica import RayCluster

        return ReplicaSet(RayCluster(replicas, build, address=ray_address,
                                     num_cpus=num_cpus_per_replica,
                                     num_gpus=num_gpus_per_replica,
                                     strategy=placement_strategy), on_failure=on_failure)
    raise ValueError(f"unknown cluster {cluster!r}; choose one of {', '.join(CLUSTERS)}")


def engine_builder(executor: str, **options: Any) -> Callable[[], Engine]:
    """A picklable ``build`` for :func:`build_replicas`: ``build_engine(executor, **options)``,
    each replica with its own copy of a policy object given as ``policy``."""
    return functools.partial(_build_engine, executor, options)


def _build_engine(executor: str, options: dict[str, Any]) -> Engine:
    from runtime.engine import build_engine

    policy = options.get("policy")
    if policy is not None and not isinstance(policy, str):  # a policy keeps per-manager state
        options = {**options, "policy": copy.deepcopy(policy)}
    return build_engine(executor, **options)
