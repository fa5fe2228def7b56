"""Running a world: ``python -m scalesim.run WORLD.yaml`` and :func:`run` from Python.

A run loads the configuration, builds the engine and the world, runs the simulation clock, and
writes the run directory (``trace.parquet``, ``memory.parquet``, ``summary.json``). The directory
is written however the run ends: completed, failed or interrupted with Ctrl-C; ``summary.json``
says which.

This is a package rather than a module so that ``scalesim.run`` can be both the :func:`run`
function and the ``python -m scalesim.run`` command (see ``__main__.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from scalesim.config import ConfigError, RunConfig, import_world_class, load_config, parse_override
from scalesim.distance import DistanceOracle
from scalesim.environment import SimEnvironment
from scalesim.progress import ProgressDisplay, print_summary
from scalesim.trace import RunResult, TraceRecorder


def default_run_dir(config: RunConfig) -> Path:
    if config.output.dir:
        return Path(config.output.dir)
    stem = config.source.stem if config.source else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _build_engine(config: RunConfig) -> Any:
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
                            **rt.engine_options())
    except ModelNotFoundError as exc:
        raise ConfigError(f"config error{where}: runtime.model: {exc}") from None


def _attach_memory(config: RunConfig, engine: Any, env: SimEnvironment,
                   recorder: TraceRecorder) -> Any:
    """Give a torch or modeled engine a MemoryManager per ``runtime.memory``; else ``None``."""
    if not hasattr(engine, "attach_memory") or not hasattr(engine.executor, "attach_memory"):
        return None
    from runtime.memory import FutureSequence, MemoryManager

    mem = config.runtime.memory
    where = f" in {config.source}" if config.source else ""
    source: Any = env.oracle
    if mem.policy == "belady":
        if not mem.belady_trace:
            raise ConfigError(f"config error{where}: runtime.memory.belady_trace: policy belady "
                              "needs the run directory of an earlier run of the same seed")
        path = Path(mem.belady_trace)
        path = path / "trace.parquet" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"config error{where}: runtime.memory.belady_trace: no trace at {path}")
        import pandas as pd

        agents = pd.read_parquet(path, columns=["request_id", "agent"]).sort_values("request_id")
        source = FutureSequence(agents["agent"].tolist())
        env.submit_listeners.append(source.on_submit)
        env.completion_listeners.append(lambda call, done: source.on_finish(call.agent_id))
    manager = MemoryManager(mem.policy, device_bytes=mem.device_bytes, host_bytes=mem.host_bytes,
                            disk_dir=mem.disk_dir,
                            # the modeled executor moves no tensors: its manager stays on the CPU
                            device="cpu" if config.runtime.executor == "modeled"
                            else config.runtime.device,
                            link_gbps=mem.link_gbps, link_latency_us=mem.link_latency_us,
                            lookahead=mem.lookahead, distance=source)
    manager.listeners.append(lambda row: recorder.record_memory(sim_time=float(env.now), **row))
    engine.attach_memory(manager)
    return manager


def _memory_summary(manager: Any) -> dict[str, Any]:
    totals = manager.totals
    accesses = totals["hits"] + totals["misses"]
    unlimited = manager.device_bytes == float("inf")  # JSON has no infinity: null = no limit
    return {"policy": manager.policy.name,
            "device_bytes": None if unlimited else int(manager.device_bytes),
            "hit_rate": round(totals["hits"] / accesses, 4) if accesses else None,
            "bytes_loaded": int(totals["bytes_loaded"]),
            "bytes_prefetched": int(totals["bytes_prefetch"]),
            "stall_s": round(totals["stall_s"], 4), "evictions": int(totals["evictions"]),
            "copy_busy_s": round(manager.copy.busy_s, 4)}


def run(
    source: str | Path | dict[str, Any] | RunConfig,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    engine: Any = None,
    **overrides: Any,
) -> RunResult:
    """Run a world and return its trace, memory log and summary.

    ``source`` is a YAML path, a dict of the same shape or a :class:`RunConfig`. Keyword
    overrides use ``__`` for the dots of ``--set``: ``run("town.yaml", sim__until=600)``.
    Pass an already built ``engine`` to run several worlds without loading the model again; the
    ``runtime`` section is then not used to build one.
    """
    config = load_config(source, {k.replace("__", "."): v for k, v in overrides.items()})
    world_cls = import_world_class(config)
    run_dir = Path(out) if out is not None else default_run_dir(config)
    engine = engine if engine is not None else _build_engine(config)

    recorder = TraceRecorder()
    env = SimEnvironment(engine)
    env.oracle = DistanceOracle(env, edge_delay=config.runtime.memory.edge_delay)
    env.completion_listeners.append(lambda call, done: recorder.record_call(call, done, env.now))
    memory = _attach_memory(config, engine, env, recorder)
    world = None
    status, error = "failed", None
    display = ProgressDisplay(enabled=progress and config.output.progress, until=config.sim.until)
    try:
        with display:
            env.completion_listeners.append(lambda call, done: display.update(env.now, done))
            world = world_cls(env, seed=config.sim.seed)
            env.oracle.graph = world.graph
            world.setup(**config.world.params)
            env.run(until=config.sim.until)
            display.finish(env.now)
        status = "completed"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        extra: dict[str, Any] = {"distance": env.oracle.quality()}
        if memory is not None:
            memory.close()
            extra["memory"] = _memory_summary(memory)
        modeled = getattr(engine.executor, "summary", None)
        if modeled is not None:  # the modeled executor's totals (makespan etc.), all modeled
            extra["modeled"] = modeled()
        result = recorder.write(
            run_dir,
            sim_time=env.now,
            status=status,
            error=error,
            unfinished_calls=len(env.in_flight),
            world=world.metrics() if world is not None else {},
            config=config.echo(),
            **extra,
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalesim.run", description="Run a ScaleSim world from its YAML file."
    )
    parser.add_argument("config", help="the world's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. sim.until=600")
    parser.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    run_dir: Path | None = None
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        config = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(config)
        result = run(config, out=run_dir, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; partial trace written to {run_dir}", file=sys.stderr)
        return 130
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first_line}", file=sys.stderr)
        if run_dir is not None and (run_dir / "summary.json").exists():
            print(f"partial trace written to {run_dir}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0
