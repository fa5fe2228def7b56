"""A ``scalesim.serve`` server on an ephemeral loopback port, for the serve tests.

:func:`running_server` builds the server from a configuration dict, runs uvicorn on a thread and
yields it once ``/health`` answers; on exit it asks uvicorn to shut down gracefully, which drains
the engine loop and writes the trace, and joins the thread.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx

from scalesim.config import load_serve_config
from scalesim.serve import Server, build_server

MODELED: dict[str, Any] = {
    "runtime": {"executor": "modeled", "model": "smollm2-135m",
                "modeled": {"replies": ["Hello from the modeled engine."], "output_tokens": 8,
                            "lora_rank": 8},
                "memory": {"policy": "scalesim"}},
    "serve": {"port": 0},
}


def modeled_config(**serve: Any) -> dict[str, Any]:
    """The modeled test configuration with ``serve`` keys replaced."""
    return {"runtime": MODELED["runtime"], "serve": {**MODELED["serve"], **serve}}


@contextmanager
def running_server(config: dict[str, Any]) -> Iterator[Server]:
    server = build_server(load_serve_config(config))
    sock = server.bind()
    thread = threading.Thread(target=server.serve, args=(sock,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    last: object = None
    while True:
        try:
            last = httpx.get(f"{base_url(server)[:-3]}/health", timeout=2).status_code
        except httpx.HTTPError as exc:  # not listening yet
            last = exc
        if last == 200:
            break
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test server did not come up (last answer: {last!r})")
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.stop()
        thread.join(60)
        assert not thread.is_alive(), "the test server did not shut down"


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"
