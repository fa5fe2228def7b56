"""``make realclient`` / ``make realclient-oasis``: a real framework's script against
``python -m scalesim.serve``.

Starts the server on the real SmolLM2-135M (torch engine, ``scalesim`` policy, loopback, a free
port, ``--trace DIR``), runs the client's script with the client venv's Python pointed at it by
base URL, then stops the server with SIGTERM (a graceful drain that writes the trace) and prints
the framework's exit status, the run's hit rates per kind and the requests' latencies (p50,
p99, how many finished within a 180 s client timeout, how many the client gave up on).
Clients: ``agentscope`` (``agentscope_village.py``), ``oasis`` (``oasis_reddit.py``),
``concordia`` (``concordia_village.py``). ``--set KEY=VALUE`` passes server settings through.
Not part of ``make test``: each needs a second virtual environment with the framework installed.
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

#: the phrase Concordia's OpenAI wrapper ends a multiple-choice prompt with, its options a line
#: each and a full stop after the last (a ``serve.choice_prompts`` pattern, YAML single-quoted)
CONCORDIA_CHOICE = r"one of the following strings:\n(?P<options>(?s:.*))\.\s*\Z"
#: per client: its script, its venv, the server settings the run uses
CLIENTS: dict[str, tuple[str, str, list[str]]] = {
    "agentscope": ("agentscope_village.py", ".venv-realclient", ["serve.default_max_tokens=48"]),
    "oasis": ("oasis_reddit.py", ".venv-oasis", ["serve.tool_choice_auto=required",
                                                 "serve.default_temperature=1"]),
    "concordia": ("concordia_village.py", ".venv-concordia", [
        f"serve.choice_prompts=['{CONCORDIA_CHOICE}']", "serve.max_tokens_cap=64"]),
}
CLIENT_TIMEOUT_S = 180.0


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


def latencies(trace: Path) -> str:
    """p50 / p99 of the served requests' latencies (engine submit to finish) and how many
    finished within :data:`CLIENT_TIMEOUT_S`; cancelled ones are those the client gave up on."""
    import numpy as np
    import pandas as pd

    calls = pd.read_parquet(trace / "trace.parquet")
    if calls.empty:
        return "no requests"
    seconds = (calls["finish_wall"] - calls["submit_wall"]).to_numpy()
    cancelled = calls["error"].fillna("").str.startswith("cancelled").to_numpy()
    ok = ~cancelled & calls["error"].isna().to_numpy()
    within = int(((seconds <= CLIENT_TIMEOUT_S) & ok).sum())
    return (f"{len(calls)} requests, latency p50 {np.percentile(seconds, 50):.1f} s, "
            f"p99 {np.percentile(seconds, 99):.1f} s, max {seconds.max():.1f} s; "
            f"{within} finished within {CLIENT_TIMEOUT_S:.0f} s, {int(cancelled.sum())} "
            f"cancelled by the client, {int((~ok & ~cancelled).sum())} failed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--client", choices=sorted(CLIENTS), default="agentscope")
    p.add_argument("--client-python", default=None, help="default: the client's venv")
    p.add_argument("--trace", default=None, help="default: runs/realclient-CLIENT "
                   "(runs/realclient for agentscope)")
    p.add_argument("--script", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting (after the client's own)")
    p.add_argument("client_args", nargs="*", help="passed to the client's script")
    args = p.parse_args()
    script, venv, settings = CLIENTS[args.client]
    trace = Path(args.trace or ROOT / ("runs/realclient" if args.client == "agentscope"
                                       else f"runs/realclient-{args.client}"))
    client_python = args.client_python or str(ROOT / venv / "bin/python")
    sets = [a for s in settings + args.set for a in ("--set", s)]
    server = subprocess.Popen(
        [sys.executable, "-m", "scalesim.serve", "--executor", "torch", "--port", "0",
         "--policy", "scalesim", "--trace", str(trace), *sets],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        print(banner, end="")
        base_url = banner.strip().rsplit(" ", 1)[-1]
        wait_healthy(base_url[:-3])
        extra = ["--workdir", str(trace / "client")] if args.client != "agentscope" else []
        client = subprocess.run([client_python, args.script or str(HERE / script), base_url,
                                 *extra, *args.client_args], cwd=ROOT)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    summary = json.loads((trace / "summary.json").read_text())
    print(f"framework script exit status {client.returncode} after "
          f"{time.monotonic() - t0:.0f} s; server: {summary['calls']} calls, "
          f"{summary['failed_calls']} failed, agents {summary.get('agents')}, "
          f"identity {summary.get('identity_sources')}, hit rate {summary['hit_rate']}")
    print(f"latency: {latencies(trace)}")
    return client.returncode or (1 if summary["calls"] == 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
