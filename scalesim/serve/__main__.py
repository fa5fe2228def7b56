"""``python -m scalesim.serve``: an OpenAI-compatible server over ScaleSim's engine.

Flags override the optional YAML file (its ``runtime`` and ``serve`` sections), and
``--set dotted.key=value`` overrides anything. A configuration error is one line and exit
code 2, as for ``python -m scalesim.run``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from scalesim.config import ConfigError, load_serve_config, parse_override


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scalesim.serve", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="YAML file with runtime: and serve: sections")
    p.add_argument("--model", help="runtime.model (default smollm2-135m)")
    p.add_argument("--executor", choices=("torch", "modeled"), help="runtime.executor")
    p.add_argument("--device", help="runtime.device")
    p.add_argument("--policy", help="runtime.memory.policy (default scalesim)")
    p.add_argument("--device-bytes", help="runtime.memory.device_bytes (e.g. 64MB)")
    p.add_argument("--adapters", help="serve.adapters: a directory of PEFT adapter dirs")
    p.add_argument("--host", help="serve.host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="serve.port (default 8000; 0: any free port)")
    p.add_argument("--served-model-name", help="serve.served_model_name")
    p.add_argument("--api-key", help="serve.api_key: require 'Authorization: Bearer KEY'")
    p.add_argument("--max-pending", type=int, help="serve.max_pending (queued + running)")
    p.add_argument("--trace", help="serve.trace: write the run directory here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set runtime.max_num_seqs=32")
    return p.parse_args(argv)


FLAGS = {"model": "runtime.model", "executor": "runtime.executor", "device": "runtime.device",
         "policy": "runtime.memory.policy", "device_bytes": "runtime.memory.device_bytes",
         "adapters": "serve.adapters", "host": "serve.host", "port": "serve.port",
         "served_model_name": "serve.served_model_name", "api_key": "serve.api_key",
         "max_pending": "serve.max_pending", "trace": "serve.trace"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Warnings and errors of every module, and one access line per request (scalesim.serve.access).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("scalesim.serve.access").setLevel(logging.INFO)
    overrides: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAGS.items()
                                 if getattr(args, flag) is not None}
    try:
        overrides.update(dict(parse_override(item) for item in args.set))
        config = load_serve_config(args.config, overrides)
        from scalesim.serve.server import build_server

        server = build_server(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    sock = server.bind()
    print(f"scalesim.serve: {config.runtime.executor} engine, model "
          f"{server.registry.base!r}, policy {config.runtime.memory.policy}, "
          f"http://{config.serve.host}:{server.port}/v1", flush=True)
    # uvicorn turns SIGTERM / SIGINT into a graceful shutdown and then re-raises the signal to
    # the handler it found installed: this one, so a drained server exits 0 instead of dying.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    server.serve(sock)
    if stopped_by:
        print(f"scalesim.serve: stopped by {signal.Signals(stopped_by[0]).name}, drained"
              + (f"; trace in {config.serve.trace}" if config.serve.trace else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
