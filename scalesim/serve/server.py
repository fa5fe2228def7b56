"""Assembling a server from its configuration, and running it under uvicorn.

:func:`build_server` is the one place a server is put together, in the order data flows::

    ServeRunConfig -> HintedDistance -> Engine (runtime.build_engine) -> EngineLoop
                   -> ServeRecorder (--trace) -> FastAPI app

:class:`Server` owns the result. :meth:`Server.serve` runs uvicorn on a socket bound here (so
port 0 gives a free port whose number is known before the first request); uvicorn turns
SIGTERM and SIGINT into a graceful shutdown: it stops accepting, lets open requests finish,
then the app drains the engine loop and :meth:`Server.shutdown` writes the trace.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import uvicorn

from runtime import build_engine
from runtime.engine import Engine
from scalesim.config import ConfigError, ServeRunConfig
from scalesim.serve.app import ServeState, create_app
from scalesim.serve.hints import HintedDistance
from scalesim.serve.identity import AdapterRegistry
from scalesim.serve.loop import EngineLoop
from scalesim.serve.recording import ServeRecorder

log = logging.getLogger("scalesim.serve")

#: The executors a server drives (both batch token by token through the same scheduler).
SERVE_EXECUTORS = ("torch", "modeled")


def engine_for(config: ServeRunConfig, distance: HintedDistance) -> Engine:
    """The engine the ``runtime`` section asks for, reading distances from ``distance``."""
    rt, mem = config.runtime, config.runtime.memory
    where = f" in {config.source}" if config.source else ""
    if rt.executor not in SERVE_EXECUTORS:
        raise ConfigError(f"config error{where}: runtime.executor: the server drives "
                          f"{' or '.join(SERVE_EXECUTORS)}, got {rt.executor!r}")
    if rt.executor == "modeled":
        from runtime.model.profiles import PROFILES

        if rt.model not in PROFILES:
            raise ConfigError(f"config error{where}: runtime.model: the modeled executor needs "
                              f"a model profile, one of {', '.join(PROFILES)}; got {rt.model!r}")
    from runtime.model.loader import ModelNotFoundError

    try:
        return build_engine(rt.executor, model=rt.model, device=rt.device, dtype=rt.dtype,
                            policy=mem.policy, device_bytes=mem.device_bytes,
                            host_bytes=mem.host_bytes, disk_dir=mem.disk_dir,
                            link_gbps=mem.link_gbps, link_latency_us=mem.link_latency_us,
                            lookahead=mem.lookahead, distance=distance, **rt.engine_options())
    except ModelNotFoundError as exc:
        raise ConfigError(f"config error{where}: runtime.model: {exc}") from None


class Server:
    """A built server: its engine loop, app and (optional) recorder."""

    def __init__(self, config: ServeRunConfig) -> None:
        self.config = config
        serve = config.serve
        where = f" in {config.source}" if config.source else ""
        try:
            self.registry = AdapterRegistry(
                [serve.served_model_name or config.runtime.model, config.runtime.model],
                serve.adapters)
        except FileNotFoundError as exc:
            raise ConfigError(f"config error{where}: serve.adapters: {exc}") from None
        self.distance = HintedDistance()
        self.engine = engine_for(config, self.distance)
        self.recorder: ServeRecorder | None = None
        if serve.trace:
            self.recorder = ServeRecorder(serve.trace, {"config": config.echo(),
                                                        "mode": "serve"})
            assert self.engine.memory is not None
            self.engine.memory.listeners.append(self.recorder.memory_row)
        self.loop = EngineLoop(self.engine, distance=self.distance,
                               max_pending=serve.max_pending,
                               default_max_tokens=serve.default_max_tokens,
                               recorder=self.recorder, pace=serve.pace)
        self.state = ServeState(self.loop, self.registry, api_key=serve.api_key,
                                on_shutdown=self.shutdown, drain_timeout_s=serve.drain_timeout_s)
        self.app = create_app(self.state)
        self.uvicorn: uvicorn.Server | None = None
        self.port: int | None = None
        self._shut = threading.Lock()
        self._done = False

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
                self.recorder.write(status, memory=self.engine.memory.summary()
                                    if self.engine.memory else None,
                                    serve_metrics={"hit_rate": self.loop.metrics.hit_rates(),
                                                   "cancelled": self.loop.metrics.cancelled,
                                                   "rejected_queue_full":
                                                       self.loop.metrics.rejected_full,
                                                   "iterations": self.loop.metrics.iterations,
                                                   "max_batch": self.loop.metrics.max_batch})
            except Exception:
                log.exception("could not write the trace to %s", self.recorder.run_dir)
        self.engine.close()


def build_server(config: ServeRunConfig) -> Server:
    """The server ``config`` describes (loads the model; see the module docstring)."""
    return Server(config)
