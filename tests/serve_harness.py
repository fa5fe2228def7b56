"""A ``scalesim.serve`` server on an ephemeral loopback port, for the serve tests.

:func:`running_server` builds the server from a configuration dict, runs uvicorn on a thread and
yields it once ``/health`` answers; on exit it asks uvicorn to shut down gracefully, which drains
the engine loop and writes the trace, and joins the thread.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


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
    with build_server(load_serve_config(config)).running(timeout_s=60) as server:
        yield server


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"
