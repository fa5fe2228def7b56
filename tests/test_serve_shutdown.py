"""``python -m scalesim.serve`` as a process: SIGTERM drains and writes the trace; bad configs.

SIGTERM while requests are in flight must answer every one of them, then write the run
directory (``trace.parquet`` in the simulation schema, ``memory.parquet``, ``summary.json``
with hit rates per kind, ``requests.parquet`` with each request's identity) and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from scalesim import load_trace
from scalesim.trace import TRACE_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalesim.serve", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_drains_in_flight_requests_and_writes_the_trace(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "runtime": {"executor": "modeled", "model": "smollm2-135m",
                    "memory": {"policy": "scalesim"},
                    "modeled": {"lora_rank": 8, "output_tokens": 8, "replies": ["Done."]}},
        "serve": {"port": 0, "pace": 60.0, "api_key": "k"}}))
    run_dir = tmp_path / "run"
    proc = start([str(config), "--trace", str(run_dir)])
    try:
        banner = proc.stdout.readline()
        assert "http://127.0.0.1:" in banner, proc.stderr.read()
        url = banner.strip().rsplit(" ", 1)[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url[:-3] + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        codes: list[int] = []

        def ask(i: int) -> None:
            headers = {"Authorization": "Bearer k"}
            if i % 2:
                headers["X-ScaleSim-Agent"] = f"agent-{i}"
            r = httpx.post(f"{url}/chat/completions", timeout=60, headers=headers, json={
                "model": "smollm2-135m", "user": f"user-{i}",
                "messages": [{"role": "system", "content": f"Persona {i % 3}."},
                             {"role": "user", "content": f"question {i}"}]})
            codes.append(r.status_code)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the requests are in the engine now
        os.kill(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert codes == [200] * 6
    result = load_trace(run_dir)
    assert result.summary["status"] == "completed"
    assert result.summary["calls"] == 6 and result.summary["failed_calls"] == 0
    assert set(result.summary["hit_rate"]) == {"adapter", "prefix_kv", "model"}
    assert result.summary["hit_rate"]["adapter"] is not None
    assert result.summary["config"]["serve"]["api_key"] == "***"
    assert list(result.trace.columns) == TRACE_SCHEMA.names
    assert len(result.memory) > 0
    requests = pd.read_parquet(run_dir / "requests.parquet")
    assert sorted(requests["identity_source"]) == ["header"] * 3 + ["user"] * 3
    assert set(requests["agent"]) == set(result.trace["agent"])
    assert result.summary["identity_sources"] == {"header": 3, "user": 3}


@pytest.mark.parametrize("args, message", [
    (["--set", "serve.bogus=1", "--executor", "modeled"], "serve.bogus: unknown key"),
    (["--executor", "modeled", "--model", "nope"], "runtime.model"),
    (["--executor", "modeled", "--set", "serve.max_pending=0"], "serve.max_pending"),
    (["--executor", "modeled", "--adapters", "/no/such/dir"], "serve.adapters"),
])
def test_config_errors_are_one_line_and_exit_2(args, message, capsys):
    from scalesim.serve.__main__ import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_serve_section_validates_like_the_rest(tmp_path):
    from scalesim.config import ConfigError, load_serve_config

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"serve": {"port": "eighty"}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: serve.port"):
        load_serve_config(path)
    config = load_serve_config({"serve": {"port": 9000}}, {"serve.pace": 2})
    assert config.serve.port == 9000 and config.serve.pace == 2.0
