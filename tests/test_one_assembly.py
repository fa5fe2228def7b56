"""One assembly from a ``runtime:`` section to an engine, for every front end.

``python -m scalesim.run`` / :func:`scalesim.simulate` and ``python -m scalesim.serve`` must turn
the same section into the same engine (memory tiers and the persistent store included), and the
server must drive a replica set as it drives one engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import runtime
import runtime.replicas
from scalesim import assembly
from scalesim.config import load_config, load_serve_config
from scalesim.serve import build_server
from scalesim.simulation import Simulation
from serve_harness import MODELED, base_url, running_server

RUNTIME: dict[str, Any] = {
    "executor": "modeled", "model": "smollm2-135m", "max_num_seqs": 8,
    "modeled": {"output_tokens": 4, "lora_rank": 8},
    "memory": {"policy": "lru", "device_bytes": "64MiB", "host_bytes": "1GiB",
               "disk_dir": "/tmp/scalesim-disk", "kv_store": "/tmp/scalesim-store",
               "kv_store_bytes": "2GiB", "lookahead": 5},
}


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record what every engine is built with (and still build it)."""
    built: list[tuple[str, dict[str, Any]]] = []
    real = runtime.build_engine

    def build(executor: str, **keywords: Any) -> runtime.Engine:
        built.append((executor, {k: v for k, v in keywords.items() if k != "distance"}))
        return real(executor, **keywords)

    monkeypatch.setattr(runtime, "build_engine", build)
    return built


def test_run_and_serve_build_the_same_engine_from_the_same_section(monkeypatch) -> None:
    built = _capture(monkeypatch)
    run = load_config({"world": {"class": "tests.tiny_world:Pingers"}, "runtime": RUNTIME})
    Simulation(run).engine.close()
    server = build_server(load_serve_config({"runtime": RUNTIME, "serve": {"port": 0}}))
    server.engine.close()
    assert len(built) == 2
    (run_executor, run_settings), (serve_executor, serve_settings) = built
    assert run_executor == serve_executor == "modeled"
    assert run_settings == serve_settings
    # The memory tiers and the store reach the engine from both (the server's copy once
    # dropped kv_store and kv_store_bytes).
    assert serve_settings["kv_store"] == "/tmp/scalesim-store"
    assert serve_settings["kv_store_bytes"] == 2 * 2**30
    assert serve_settings["disk_dir"] == "/tmp/scalesim-disk"
    assert serve_settings["device_bytes"] == 64 * 2**20


def test_replicas_are_assembled_for_both_front_ends(monkeypatch) -> None:
    made: list[int] = []
    real = runtime.replicas.build_replicas

    def build(replicas: int, *args: Any, **kwargs: Any) -> runtime.replicas.ReplicaSet:
        made.append(replicas)
        return real(replicas, *args, **kwargs)

    monkeypatch.setattr(runtime.replicas, "build_replicas", build)
    section = {**RUNTIME, "replicas": 2}
    engine = assembly.assemble_engine(load_serve_config({"runtime": section}).runtime)
    engine.close()
    Simulation(load_config({"world": {"class": "tests.tiny_world:Pingers"},
                            "runtime": section})).engine.close()
    assert made == [2, 2]


def test_the_server_runs_over_two_local_replicas(tmp_path: Path) -> None:
    config = {"runtime": {**MODELED["runtime"], "replicas": 2},
              "serve": {"port": 0, "trace": str(tmp_path / "trace")}}
    personas = [f"You are agent {i} of the replicated town." for i in range(6)]
    with running_server(config) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        agents = set()
        for persona in personas:
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2-135m", max_tokens=8,
                messages=[{"role": "system", "content": persona},
                          {"role": "user", "content": "Hello?"}])
            reply = raw.parse()
            assert reply.choices[0].message.content == "Hello from the modeled engine."
            assert reply.usage.completion_tokens == 8
            agents.add(raw.headers["x-scalesim-agent"])
        stream = client.chat.completions.create(
            model="smollm2-135m", max_tokens=8, stream=True,
            messages=[{"role": "system", "content": personas[0]},
                      {"role": "user", "content": "Stream it."}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            "Hello from the modeled engine."
        metrics = httpx.get(f"{base_url(server)[:-3]}/metrics").text
        assert 'scalesim_memory_objects{state="registered"}' in metrics
    assert len(agents) == len(personas)
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    replicas = summary["replicas"]
    assert replicas["count"] == 2 and replicas["cluster"] == "local"
    per_replica = replicas["per_replica"]
    assert sum(r["calls"] for r in per_replica) == len(personas) + 1
    assert all(r["calls"] > 0 for r in per_replica), per_replica
    assert summary["status"] == "completed"
