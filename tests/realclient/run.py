"""``make realclient``: a real framework's script against ``python -m scalesim.serve``.

Starts the server on the real SmolLM2-135M (torch engine, ``scalesim`` policy, loopback, a free
port, ``--trace runs/realclient``), runs ``agentscope_village.py`` with the client venv's
Python pointed at it by base URL, then stops the server with SIGTERM (a graceful drain that
writes the trace) and prints the framework's exit status and the run's hit rates per kind.
Not part of ``make test``: it needs a second virtual environment with the framework installed.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not come up")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--client-python", default=str(ROOT / ".venv-realclient/bin/python"))
    p.add_argument("--trace", default=str(ROOT / "runs/realclient"))
    p.add_argument("--script", default=str(HERE / "agentscope_village.py"))
    args = p.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "scalesim.serve", "--executor", "torch", "--port", "0",
         "--policy", "scalesim", "--trace", args.trace,
         "--set", "serve.default_max_tokens=48"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        print(banner, end="")
        base_url = banner.strip().rsplit(" ", 1)[-1]
        wait_healthy(base_url[:-3])
        client = subprocess.run([args.client_python, args.script, base_url], cwd=ROOT)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    summary = json.loads((Path(args.trace) / "summary.json").read_text())
    print(f"framework script exit status {client.returncode}; server: {summary['calls']} calls, "
          f"{summary['failed_calls']} failed, agents {summary.get('agents')}, "
          f"identity {summary.get('identity_sources')}, hit rate {summary['hit_rate']}")
    return client.returncode or (1 if summary["calls"] == 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
