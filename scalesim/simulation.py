"""One run of a world, assembled in one place: :class:`Simulation` and :func:`simulate`.

Whatever starts a run — ``python -m scalesim.run``, :func:`simulate` from Python, or an
experiment harness — goes through :class:`Simulation`, which assembles it in the order data
flows::

    config -> engine (scalesim.assembly) -> SimEnvironment + DistanceOracle
           -> the memory manager's distance source -> world -> clock -> run directory

The distance source is the oracle itself, or for ``belady`` the call order of an earlier run of
the same seed (:class:`runtime.memory.FutureSequence`); a harness may wrap the oracle (to add
noise, say) or pass a policy object of its own (an ablation). The run directory
(``trace.parquet``, ``memory.parquet``, ``summary.json``) is written however the run ends:
completed, failed or interrupted; ``summary.json`` says which. While the run goes, its rows are
flushed there in parts (:mod:`scalesim.trace`), so a killed run keeps its calls too.

Before the model loads, :mod:`scalesim.preflight` checks every path the configuration names. The
clock loop stops at a safe point when asked (:meth:`Simulation.request_stop`): by a signal
(:mod:`scalesim.stopping`), or at the first failed call with ``run.fail_fast``.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

from runtime.interface import EngineEvent, EngineInterface
from runtime.memory import DistanceSource, FutureSequence, Policy
from runtime.memory.events import MemoryEvent
from runtime.replicas import ReplicaFailure
from scalesim.assembly import assemble_engine
from scalesim.config import ConfigError, RunConfig, import_world_class, load_config
from scalesim.distance import DistanceOracle
from scalesim.environment import LLMCall, SimEnvironment, relaxed_gc
from scalesim.preflight import check_config, check_run_dir
from scalesim.stopping import RunFailed, RunInterrupted, StopSignals
from scalesim.replay import Replay
from scalesim.trace import RecordError, RunResult, TraceRecorder, error_counts
from scalesim.world import World
from scalesim.world_frames import describe, world_frame


def recorded_order(config: RunConfig) -> list[str]:
    """The call order of the run ``runtime.memory.belady_trace`` names (policy ``belady``)."""
    mem = config.runtime.memory
    if not mem.belady_trace:
        raise ConfigError.at(config.source, "runtime.memory.belady_trace", "policy belady needs "
                             "the run directory of an earlier run of the same seed")
    path = Path(mem.belady_trace)
    path = path / "trace.parquet" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError.at(config.source, "runtime.memory.belady_trace", f"no trace at {path}")
    import pandas as pd

    calls = pd.read_parquet(path, columns=["request_id", "agent"]).sort_values("request_id")
    return [str(agent) for agent in calls["agent"]]


class Simulation:
    """A world on an engine, with its clock, oracle, memory wiring and (optional) recorder.

    ``engine`` reuses an already built engine (the ``runtime`` section is then not used to
    build one). ``policy`` replaces the configured memory policy by an object; ``distance``
    wraps the oracle into the source the memory manager reads; ``order`` is the recorded call
    order for ``belady`` (else read from ``runtime.memory.belady_trace``). ``record=False``
    keeps no trace (large modeled experiments).
    """

    def __init__(self, config: RunConfig, *, engine: EngineInterface | None = None,
                 policy: Policy | None = None,
                 distance: Callable[[DistanceOracle], DistanceSource] | None = None,
                 order: list[str] | None = None, record: bool = True) -> None:
        self.config = config
        self.world_class = import_world_class(config)
        check_config(config, self.world_class, engine=engine,
                     needs_belady_trace=order is None and policy is None)
        # Read and checked before the model loads: a wrong record is a configuration error.
        replay = Replay(config.replay.run, config.replay.mode) if config.replay.run else None
        if replay is not None:
            replay.check_compatible(config)
        mem = config.runtime.memory
        self.oracle: DistanceOracle | None = None

        def observe(env: SimEnvironment) -> DistanceOracle:
            self.oracle = DistanceOracle(env, edge_delay=mem.edge_delay,
                                         call_duration=config.sim.call_duration)
            return self.oracle

        self.env = SimEnvironment(None, observer=observe,  # the engine is attached below
                                  call_duration=config.sim.call_duration)
        assert self.oracle is not None
        self.env.replay = replay
        self.world: World | None = None
        self.setup_seconds: float = 0.0
        self.run_seconds: float = 0.0
        #: CPU seconds of this process while :meth:`run` ran (steadier than wall seconds on a
        #: machine shared with other jobs)
        self.run_cpu_seconds: float = 0.0
        # The world is set up before the model loads, so that a bad world.params (or any error
        # of the world's setup) is a configuration error within seconds.
        self._set_up_world()
        self.engine: EngineInterface = engine if engine is not None else assemble_engine(
            config.runtime, source=config.source, policy=policy)
        self.env.attach(self.engine)
        self.recorder: TraceRecorder | None = TraceRecorder() if record else None
        #: the agent of every call, in submission order (what ``belady`` replays)
        self.calls: list[str] = []
        #: the error of every failed call, and the count of finished calls (failed ones too)
        self.failed: list[str] = []
        self.finished: int = 0
        #: what the clock loop raises at its next safe point (see :meth:`request_stop`)
        self.stop_reason: BaseException | None = None
        self._stoppable: bool = False
        self.env.submit_listeners.append(self.calls.append)
        self.env.completion_listeners.append(self._completed)
        source: DistanceSource = distance(self.oracle) if distance else self.oracle
        clock: Callable[[], float] = lambda: float(self.env.now)
        if self.engine.policy_name == "belady":
            future = FutureSequence(order if order is not None else recorded_order(config))
            self.env.submit_listeners.append(future.on_submit)
            self.env.completion_listeners.append(
                lambda call, done: future.on_finish(call.agent_id))
            self.env.held_listeners.append(lambda call: future.on_answered(call.agent_id, call.due))
            source, clock = future, lambda: float(future.cursor)
        self.engine.use_distance(source, clock)
        if self.recorder is not None:
            self.engine.listen(self._engine_event)
        if config.runtime.memory.declare_agents:
            self._declare_agents()

    def _declare_agents(self) -> None:
        """Make every LLM agent's memory objects known to the engine (counted as setup time)."""
        assert self.world is not None
        start = time.perf_counter()
        with relaxed_gc():  # a million agents' objects: the default collector rescans them
            for agent in self.world.agents.values():
                if agent.calls_llm:  # the others hold no memory
                    self.engine.declare(agent.name, agent.persona, agent.adapter)
        self.setup_seconds += time.perf_counter() - start

    def _completed(self, call: LLMCall, done: Any) -> None:
        self.finished += 1
        if not done.ok:
            self.failed.append(done.error)
            if self.config.run.fail_fast:
                self.request_stop(RunFailed(f"run.fail_fast: request {done.request_id} of agent "
                                            f"{done.agent_id!r} failed: {done.error}"))
        if self.recorder is not None:
            try:
                self.recorder.record_call(call, done, self.env.now)
            except RecordError as exc:  # inside an engine iteration: stop after it, not in it
                self.request_stop(exc)

    def _engine_event(self, event: EngineEvent) -> None:
        if not isinstance(event, MemoryEvent):
            return
        assert self.recorder is not None
        try:
            self.recorder.record_memory(sim_time=float(self.env.now), **event.row())
        except RecordError as exc:
            self.request_stop(exc)

    def request_stop(self, reason: BaseException) -> bool:
        """Ask the run to stop at its next safe point and raise ``reason`` there.

        The safe points are between two steps of the clock loop, so no engine iteration is cut
        in half and every finished call is recorded. During :meth:`finish` a request is held
        until the run directory is written. Returns False when the run is at neither (building,
        say): the caller should then raise ``reason`` itself. The first reason wins.
        """
        if not self._stoppable:
            return False
        if self.stop_reason is None:
            self.stop_reason = reason
        return True

    def _set_up_world(self) -> None:
        """Create the world and its agents (``world.params``); an error is a ConfigError."""
        start = time.perf_counter()
        try:
            with relaxed_gc():
                world = self.world_class(self.env, seed=self.config.sim.seed)
                world.setup(**self.config.world.params)
        except Exception as exc:
            raise ConfigError.at(self.config.source, "world.params",
                                 f"{self.world_class.__name__}.setup failed: "
                                 f"{describe(exc)}") from exc
        self.world = world
        self.setup_seconds = time.perf_counter() - start

    def build_world(self) -> World:
        """The world and its agents, set up when the simulation was made."""
        assert self.world is not None
        return self.world

    def run(self, until: float | None = None, max_calls: int | None = None) -> None:
        """Run the clock to ``until`` (default ``sim.until``; ``math.inf``: until nothing is
        left), or until ``max_calls`` calls have been submitted.

        A stop requested meanwhile (:meth:`request_stop`) raises its reason between two steps.
        """
        until = self.config.sim.until if until is None else until
        start, cpu = time.perf_counter(), time.process_time()
        env = self.env
        self._stoppable = True
        try:
            with relaxed_gc():
                limit = math.inf if until is None else until
                if max_calls is None:
                    self._run_until(limit)
                    return
                # env.step() runs engine iterations too; stop at the limit or when all is done.
                calls = self.calls
                while len(calls) < max_calls:
                    upcoming = env.next_time()
                    if upcoming > limit:
                        break
                    if self.stop_reason is not None:
                        raise self.stop_reason
                    if upcoming == math.inf:
                        break
                    env.step()
        finally:
            self._stoppable = False
            self.run_seconds = time.perf_counter() - start
            self.run_cpu_seconds = time.process_time() - cpu

    def _run_until(self, limit: float) -> None:
        """``env.run(until=limit)`` step by step, with a safe point between steps.

        The loop ends where simpy's would: before the first step that would act at or after
        ``limit`` (:meth:`SimEnvironment.next_time`: an engine iteration for calls due before
        ``limit`` still runs first, so they return before the clock moves on; calls due later
        stay in flight). ``env.run`` then moves the clock onto ``limit`` as it would.
        """
        env = self.env
        while True:
            if self.stop_reason is not None:
                raise self.stop_reason
            if env.next_time() >= limit:
                break
            env.step()
        if limit != math.inf:
            env.run(until=limit)

    def summary(self) -> dict[str, Any]:
        """The sections of ``summary.json`` beyond the trace's own totals."""
        assert self.oracle is not None
        replay = {"replay": self.env.replay.report()} if self.env.replay is not None else {}
        return {"distance": self.oracle.quality(), "occupancy": self.env.occupancy.summary(),
                **self.engine.report(), **replay}

    def check_failures(self) -> RunFailed | None:
        """The failure policy's verdict on a run that went to its end (None: it passes)."""
        limit = self.config.run.max_failed_fraction
        if not self.finished or len(self.failed) / self.finished <= limit:
            return None
        common = error_counts(self.failed, top=1)[0]
        return RunFailed(f"{len(self.failed)} of {self.finished} calls failed, more than "
                         f"run.max_failed_fraction={limit:g}; most common ({common['count']}x): "
                         f"{common['error']}")

    def finish(self, run_dir: str | Path, status: str, error: str | None = None) -> RunResult:
        """Stop the engine's copy engine and write the run directory.

        A stop requested meanwhile waits for the write (see :meth:`request_stop`).
        """
        self._stoppable = True
        try:
            self.engine.close()
            if self.recorder is None:
                raise RuntimeError("this simulation keeps no trace (record=False)")
            # A run stopped by an error may leave the engine or the world unable to report;
            # the record of its calls matters more than these sections.
            try:
                sections = self.summary()
            except Exception as exc:
                sections = {"report_error": f"{type(exc).__name__}: {exc}"}
            try:
                world = ({**self.world.counters(), **self.world.metrics()}
                         if self.world is not None else {})
            except Exception as exc:
                world = {"metrics_error": f"{type(exc).__name__}: {exc}"}
            return self.recorder.write(
                Path(run_dir), sim_time=self.env.now, status=status, error=error,
                unfinished_calls=len(self.env.in_flight), world=world,
                config=self.config.echo(), **sections)
        finally:
            self._stoppable = False


def default_run_dir(config: RunConfig) -> Path:
    if config.output.dir:
        return Path(config.output.dir)
    stem = config.source.stem if config.source else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def simulate(source: str | Path | dict[str, Any] | RunConfig, *, out: str | Path | None = None,
             progress: bool = False, engine: EngineInterface | None = None,
             resume: str | Path | None = None, **overrides: Any) -> RunResult:
    """Run a world and return its trace, memory log and summary.

    ``source`` is a YAML path, a dict of the same shape or a :class:`RunConfig`. Keyword
    overrides use ``__`` for the dots of ``--set``: ``simulate("town.yaml", sim__until=600)``.
    Pass an already built ``engine`` to run several worlds without loading the model again; the
    ``runtime`` section is then not used to build one. ``resume``: the directory of an earlier
    run of this world (killed or not) whose calls are replayed while they match, then the run
    goes live (``replay.run`` with ``replay.mode: resume``; see :mod:`scalesim.replay`).

    The run directory is written however the run ends. Raises :class:`ConfigError` for a
    problem found before the run (nothing is written then); :class:`RunFailed`, carrying the
    result, when the run breaks its failure policy (the ``run`` section); :class:`RunInterrupted`
    when SIGINT, SIGTERM or SIGHUP stopped it; and whatever else stopped it as it is. The
    signal handlers in place before are restored.
    """
    settings = {k.replace("__", "."): v for k, v in overrides.items()}
    if resume is not None:
        settings.update({"replay.run": str(resume), "replay.mode": "resume"})
    config = load_config(source, settings)
    run_dir = Path(out) if out is not None else default_run_dir(config)
    check_run_dir(run_dir, config)
    if config.replay.run is not None and Path(config.replay.run).resolve() == run_dir.resolve():
        raise ConfigError.at(config.source, "replay.run", f"{run_dir} is this run's own "
                             "directory; write the resumed run to another (--out)")
    sim: Simulation | None = None
    signals = 0

    def defer(exc: RunInterrupted) -> bool:
        # The first signal waits for a safe point; a second one (or one while the model loads)
        # stops at once.
        nonlocal signals
        signals += 1
        return signals == 1 and sim is not None and sim.request_stop(exc)

    with StopSignals(defer):
        sim = Simulation(config, engine=engine)
        return _run_and_write(sim, run_dir, progress)


def _run_and_write(sim: Simulation, run_dir: Path, progress: bool) -> RunResult:
    """Build and run ``sim``'s world, then write ``run_dir`` whatever happened (see simulate)."""
    from scalesim.progress import ProgressDisplay

    config = sim.config
    display = ProgressDisplay(enabled=progress and config.output.progress, until=config.sim.until,
                              every=config.output.progress_every, occupancy=sim.env.occupancy)
    status, error = "failed", None
    failure: RunFailed | None = None
    interrupted: tuple[RunInterrupted, KeyboardInterrupt] | None = None
    try:
        assert sim.recorder is not None
        sim.recorder.open(run_dir, flush_calls=config.output.flush_calls,
                          flush_seconds=config.output.flush_seconds, config=config.echo())
        with display:
            sim.env.completion_listeners.append(lambda call, done: display.update(sim.env.now,
                                                                                  done))
            sim.run()
            display.finish(sim.env.now)
        failure = sim.check_failures()
        status = "completed" if failure is None else "failed"
    except RunFailed as exc:
        failure, status = exc, "failed"
    except KeyboardInterrupt as exc:  # a world's own KeyboardInterrupt counts as Ctrl-C
        stop = exc if isinstance(exc, RunInterrupted) else RunInterrupted(signal.SIGINT)
        interrupted, status, error = (stop, exc), "interrupted", str(stop)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (RecordError, ReplicaFailure)) or world_frame(exc) is None:
            raise  # the library's or the machine's own failure (a full disk, a dead replica)
        # An error in the world's code: name its line (the traceback stays on the cause).
        failure = RunFailed(describe(exc), cause=exc)
    finally:
        if failure is not None:
            error = f"RunFailed: {failure}"
        result = sim.finish(run_dir, status, error)
    if failure is not None and failure.cause is not None:
        failure.result = result
        raise failure from failure.cause
    if interrupted is not None:
        stop, cause = interrupted
        stop.result = result
        raise stop from (cause if cause is not stop else None)
    if failure is not None:
        failure.result = result
        raise failure
    return result
