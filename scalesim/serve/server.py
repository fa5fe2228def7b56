"""Assembling a server from its configuration, and running it under uvicorn.

:func:`build_server` is the one place a server is put together, in the order data flows::

    ServeRunConfig -> HintedDistance (or HintsOrEstimate) -> engine (scalesim.assembly) -> EngineLoop
                   -> ServeRecorder (--trace) -> FastAPI app

The engine is the one a simulation run of the same ``runtime:`` section would get (memory tiers,
persistent store and replicas included).

:class:`Server` owns the result. :meth:`Server.serve` runs uvicorn on a socket bound here (so
port 0 gives a free port whose number is known before the first request); uvicorn turns
SIGTERM and SIGINT into a graceful shutdown: it stops accepting, lets open requests finish,
then the app drains the engine loop and :meth:`Server.shutdown` writes the trace.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import uvicorn

from runtime.interface import EngineEvent, EngineInterface
from runtime.memory.events import MemoryEvent
from scalesim.assembly import assemble_engine
from scalesim.config import ConfigError, ServeRunConfig
from scalesim.serve.app import ServeState, create_app
from scalesim.serve.hints import HintedDistance
from scalesim.serve.hints_or_estimate import HintsOrEstimate
from scalesim.serve.identity import AdapterRegistry
from scalesim.serve.loop import EngineLoop
from scalesim.serve.recording import ServeRecorder

log = logging.getLogger("scalesim.serve")

#: The executors a server drives (both batch token by token through the same scheduler).
SERVE_EXECUTORS = ("torch", "modeled")


def engine_for(config: ServeRunConfig, distance: HintedDistance,
               clock: Callable[[], float]) -> EngineInterface:
    """The engine the ``runtime`` section asks for, reading distances from ``distance`` whose
    order keys are times on ``clock``."""
    rt = config.runtime
    if rt.executor not in SERVE_EXECUTORS:
        raise ConfigError.at(config.source, "runtime.executor", "the server drives "
                             f"{' or '.join(SERVE_EXECUTORS)}, got {rt.executor!r}")
    engine = assemble_engine(rt, source=config.source)
    engine.use_distance(distance, clock)
    return engine


class Server:
    """A built server: its engine loop, app and (optional) recorder."""

    def __init__(self, config: ServeRunConfig) -> None:
        self.config = config
        serve = config.serve
        try:
            self.registry = AdapterRegistry(
                [serve.served_model_name or config.runtime.model, config.runtime.model],
                serve.adapters)
        except FileNotFoundError as exc:
            raise ConfigError.at(config.source, "serve.adapters", str(exc)) from None
        start = time.monotonic()
        clock: Callable[[], float] = lambda: time.monotonic() - start  # server time
        # Hints where clients send them; elsewhere the stream's estimate (serve.stream_estimator)
        # or nothing (recency, the manager's tie break).
        self.distance = HintsOrEstimate(clock) if serve.stream_estimator \
            else HintedDistance(clock)
        self.engine = engine_for(config, self.distance, clock)
        self.recorder: ServeRecorder | None = None
        if serve.trace:
            self.recorder = ServeRecorder(serve.trace, {"config": config.echo(),
                                                        "mode": "serve"})
            self.engine.listen(self._record_event)
        self.loop = EngineLoop(self.engine, distance=self.distance,
                               max_pending=serve.max_pending,
                               default_max_tokens=serve.default_max_tokens,
                               max_tokens_cap=serve.max_tokens_cap,
                               recorder=self.recorder, pace=serve.pace)
        self.state = ServeState(self.loop, self.registry, api_key=serve.api_key,
                                on_shutdown=self.shutdown, drain_timeout_s=serve.drain_timeout_s,
                                tool_choice_auto=serve.tool_choice_auto,
                                default_temperature=serve.default_temperature,
                                choice_prompts=tuple(re.compile(p) for p in serve.choice_prompts))
        self.app = create_app(self.state)
        self.uvicorn: uvicorn.Server | None = None
        self.port: int | None = None
        self._shut = threading.Lock()
        self._done = False

    def distance_summary(self) -> dict[str, Any]:
        """Where the memory manager's distances came from (``summary.json``)."""
        d = self.distance
        out: dict[str, Any] = {"source": "hints", "hints_applied": d.applied,
                               "hints_expired": d.expired}
        if isinstance(d, HintsOrEstimate):
            est = d.estimator
            out.update(source="hints, else the stream estimate", estimated_agents=est.estimated,
                       stream_predictions=est.predictions, stream_rounds=est.rounds,
                       stream_lockstep=est.lockstep)
        return out

    def _record_event(self, event: EngineEvent) -> None:
        if self.recorder is not None and isinstance(event, MemoryEvent):
            self.recorder.memory_row(event)

    def bind(self) -> socket.socket:
        """A listening socket on ``serve.host:serve.port``; sets :attr:`port`."""
        family = socket.AF_INET6 if ":" in self.config.serve.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.serve.host, self.config.serve.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        return sock

    def serve(self, sock: socket.socket | None = None, **uvicorn_options: Any) -> None:
        """Run until shut down (SIGTERM / SIGINT in the main thread, or :meth:`stop`)."""
        sock = sock or self.bind()
        self.loop.start()
        options = {"log_level": "warning", "timeout_graceful_shutdown":
                   self.config.serve.drain_timeout_s, **uvicorn_options}
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, **options))
        try:
            self.uvicorn.run(sockets=[sock])
        finally:
            self.shutdown()  # also when uvicorn failed before the app's lifespan ended

    @contextmanager
    def running(self, timeout_s: float = 120.0) -> Iterator[Server]:
        """Serve on a thread for the ``with`` block (tests, benchmarks, notebooks; with
        ``serve.port: 0`` on an ephemeral port, :attr:`port`): ready when the block starts,
        stopped and drained when it ends. Raises :class:`RuntimeError` if the server does not
        come up, or does not shut down, within ``timeout_s``."""
        sock = self.bind()
        thread = threading.Thread(target=self.serve, args=(sock,), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self.uvicorn is not None and self.uvicorn.started):
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up within {timeout_s:g} s")
            time.sleep(0.02)
        try:
            yield self
        finally:
            self.stop()
            thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"the server did not shut down within {timeout_s:g} s")

    def stop(self) -> None:
        """Ask uvicorn to shut down gracefully (from another thread)."""
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def shutdown(self) -> None:
        """Drain the engine loop, close the engine and write the trace (once)."""
        with self._shut:
            if self._done:
                return
            self._done = True
        drained = self.loop.drain(self.config.serve.drain_timeout_s)
        self.loop.stop()
        status = "completed" if drained and self.loop.healthy else "interrupted"
        if self.recorder is not None:
            try:
                self.recorder.write(status, **self.engine.report(),
                                    serve_metrics={"hit_rate": self.loop.metrics.hit_rates(),
                                                   "cancelled": self.loop.metrics.cancelled,
                                                   "rejected_queue_full":
                                                       self.loop.metrics.rejected_full,
                                                   "iterations": self.loop.metrics.iterations,
                                                   "max_batch": self.loop.metrics.max_batch,
                                                   "distances": self.distance_summary()})
            except Exception:
                log.exception("could not write the trace to %s", self.recorder.run_dir)
        self.engine.close()


def build_server(config: ServeRunConfig) -> Server:
    """The server ``config`` describes (loads the model; see the module docstring)."""
    return Server(config)
