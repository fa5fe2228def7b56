"""One run of a world, assembled in one place: :class:`Simulation` and :func:`simulate`.

Whatever starts a run — ``python -m scalesim.run``, :func:`simulate` from Python, or an
experiment harness — goes through :class:`Simulation`, which assembles it in the order data
flows::

    config -> engine (runtime.build_engine) -> SimEnvironment + DistanceOracle
           -> the memory manager's distance source -> world -> clock -> run directory

The distance source is the oracle itself, or for ``belady`` the call order of an earlier run of
the same seed (:class:`runtime.memory.FutureSequence`); a harness may wrap the oracle (to add
noise, say) or pass a policy object of its own (an ablation). The run directory
(``trace.parquet``, ``memory.parquet``, ``summary.json``) is written however the run ends:
completed, failed or interrupted; ``summary.json`` says which.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from runtime.engine import EngineProtocol
from runtime.memory import DistanceSource, FutureSequence, Policy
from scalesim.config import ConfigError, RunConfig, import_world_class, load_config
from scalesim.distance import DistanceOracle
from scalesim.environment import LLMCall, SimEnvironment, relaxed_gc
from scalesim.trace import RunResult, TraceRecorder
from scalesim.world import World


def memory_options(config: RunConfig, policy: Policy | None = None) -> dict[str, Any]:
    """The memory keywords of :func:`runtime.build_engine` from ``runtime.memory``."""
    mem = config.runtime.memory
    return {"policy": policy or mem.policy, "device_bytes": mem.device_bytes,
            "host_bytes": mem.host_bytes, "disk_dir": mem.disk_dir, "link_gbps": mem.link_gbps,
            "link_latency_us": mem.link_latency_us, "lookahead": mem.lookahead}


def build_engine_for(config: RunConfig, policy: Policy | None = None,
                     **options: Any) -> EngineProtocol:
    """The engine the ``runtime`` section asks for (``policy`` replaces the named one;
    ``options`` add executor keywords, e.g. an already loaded ``hf_model`` and ``tokenizer``)."""
    from runtime import build_engine
    from runtime.model.loader import ModelNotFoundError

    rt = config.runtime
    where = f" in {config.source}" if config.source else ""
    if rt.executor == "modeled":
        from runtime.model.profiles import PROFILES

        if rt.model not in PROFILES:
            raise ConfigError(f"config error{where}: runtime.model: the modeled executor needs a "
                              f"model profile, one of {', '.join(PROFILES)}; got {rt.model!r}")
    try:
        return build_engine(rt.executor, model=rt.model, device=rt.device, dtype=rt.dtype,
                            **memory_options(config, policy), **rt.engine_options(), **options)
    except ModelNotFoundError as exc:
        raise ConfigError(f"config error{where}: runtime.model: {exc}") from None


def recorded_order(config: RunConfig) -> list[str]:
    """The call order of the run ``runtime.memory.belady_trace`` names (policy ``belady``)."""
    mem = config.runtime.memory
    where = f" in {config.source}" if config.source else ""
    if not mem.belady_trace:
        raise ConfigError(f"config error{where}: runtime.memory.belady_trace: policy belady "
                          "needs the run directory of an earlier run of the same seed")
    path = Path(mem.belady_trace)
    path = path / "trace.parquet" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"config error{where}: runtime.memory.belady_trace: no trace at {path}")
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

    def __init__(self, config: RunConfig, *, engine: EngineProtocol | None = None,
                 policy: Policy | None = None,
                 distance: Callable[[DistanceOracle], DistanceSource] | None = None,
                 order: list[str] | None = None, record: bool = True) -> None:
        self.config = config
        self.world_class = import_world_class(config)
        self.engine = engine if engine is not None else build_engine_for(config, policy)
        mem = config.runtime.memory
        self.oracle: DistanceOracle | None = None

        def observe(env: SimEnvironment) -> DistanceOracle:
            self.oracle = DistanceOracle(env, edge_delay=mem.edge_delay)
            return self.oracle

        self.env = SimEnvironment(self.engine, observer=observe)
        assert self.oracle is not None
        self.recorder: TraceRecorder | None = TraceRecorder() if record else None
        #: the agent of every call, in submission order (what ``belady`` replays)
        self.calls: list[str] = []
        self.failed: list[str] = []
        self.env.submit_listeners.append(self.calls.append)
        self.env.completion_listeners.append(self._completed)
        manager = self.engine.memory
        if manager is not None:
            source: DistanceSource = distance(self.oracle) if distance else self.oracle
            if manager.policy.name == "belady":
                future = FutureSequence(order if order is not None else recorded_order(config))
                self.env.submit_listeners.append(future.on_submit)
                self.env.completion_listeners.append(
                    lambda call, done: future.on_finish(call.agent_id))
                source = future
            manager.use_distance(source)
            if self.recorder is not None:
                recorder, env = self.recorder, self.env
                manager.listeners.append(
                    lambda row: recorder.record_memory(sim_time=float(env.now), **row))
        self.world: World | None = None
        self.setup_seconds: float = 0.0
        self.run_seconds: float = 0.0

    def _completed(self, call: LLMCall, done: Any) -> None:
        if not done.ok:
            self.failed.append(done.error)
        if self.recorder is not None:
            self.recorder.record_call(call, done, self.env.now)

    def build_world(self) -> World:
        """Create the world and its agents (``world.params``)."""
        start = time.perf_counter()
        with relaxed_gc():
            world = self.world_class(self.env, seed=self.config.sim.seed)
            self.world = world
            world.setup(**self.config.world.params)
        self.setup_seconds = time.perf_counter() - start
        return world

    def run(self, until: float | None = None, max_calls: int | None = None) -> None:
        """Run the clock to ``until`` (default ``sim.until``; ``math.inf``: until nothing is
        left), or until ``max_calls`` calls have been submitted."""
        if self.world is None:
            self.build_world()
        until = self.config.sim.until if until is None else until
        start = time.perf_counter()
        try:
            if max_calls is None:
                self.env.run(until=None if until == math.inf else until)
                return
            with relaxed_gc():
                limit = math.inf if until is None else until
                # env.step() runs engine iterations too; stop at the limit or when all is done.
                while len(self.calls) < max_calls and (self.env.in_flight
                                                      or self.env.peek() <= limit):
                    if self.env.peek() == math.inf and not self.env.in_flight:
                        break
                    self.env.step()
        finally:
            self.run_seconds = time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        """The sections of ``summary.json`` beyond the trace's own totals."""
        assert self.oracle is not None
        return {"distance": self.oracle.quality(), **self.engine.report()}

    def finish(self, run_dir: str | Path, status: str, error: str | None = None) -> RunResult:
        """Stop the engine's copy engine and write the run directory."""
        self.engine.close()
        if self.recorder is None:
            raise RuntimeError("this simulation keeps no trace (record=False)")
        return self.recorder.write(
            Path(run_dir), sim_time=self.env.now, status=status, error=error,
            unfinished_calls=len(self.env.in_flight),
            world=self.world.metrics() if self.world is not None else {},
            config=self.config.echo(), **self.summary())


def default_run_dir(config: RunConfig) -> Path:
    if config.output.dir:
        return Path(config.output.dir)
    stem = config.source.stem if config.source else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def simulate(source: str | Path | dict[str, Any] | RunConfig, *, out: str | Path | None = None,
             progress: bool = False, engine: EngineProtocol | None = None,
             **overrides: Any) -> RunResult:
    """Run a world and return its trace, memory log and summary.

    ``source`` is a YAML path, a dict of the same shape or a :class:`RunConfig`. Keyword
    overrides use ``__`` for the dots of ``--set``: ``simulate("town.yaml", sim__until=600)``.
    Pass an already built ``engine`` to run several worlds without loading the model again; the
    ``runtime`` section is then not used to build one.
    """
    from scalesim.progress import ProgressDisplay

    config = load_config(source, {k.replace("__", "."): v for k, v in overrides.items()})
    run_dir = Path(out) if out is not None else default_run_dir(config)
    sim = Simulation(config, engine=engine)
    display = ProgressDisplay(enabled=progress and config.output.progress, until=config.sim.until)
    status, error = "failed", None
    try:
        with display:
            sim.env.completion_listeners.append(lambda call, done: display.update(sim.env.now,
                                                                                  done))
            sim.build_world()
            sim.run()
            display.finish(sim.env.now)
        status = "completed"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result = sim.finish(run_dir, status, error)
    return result
