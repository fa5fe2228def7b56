"""Engine replicas as Ray actors on a Ray instance the tests start themselves (2 CPUs)."""

from __future__ import annotations

import json

import pytest

import scalesim
from runtime.replicas import ReplicaFailure
from tests.test_replicas import modeled

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def killed(on_failure: str) -> dict:
    return {"world": {"class": "tests.replica_worlds:KillsReplica",
                      "params": {"agents": 6, "rounds": 4, "kill_at": 1.5, "replica": 1}},
            "runtime": {"executor": "modeled", "model": "qwen2.5-7b", "replicas": 2,
                        "cluster": "ray", "on_replica_failure": on_failure,
                        "ray": {"num_cpus_per_replica": 1}},
            "sim": {"until": 10}}


def test_ray_replicas_serve_as_the_in_process_ones(ray_instance, tmp_path):
    local = scalesim.simulate(modeled(2), out=tmp_path / "local")
    remote = scalesim.simulate(modeled(2, cluster="ray"), out=tmp_path / "ray")
    assert remote.summary["status"] == "completed"
    columns = ["request_id", "agent", "sim_time", "prompt", "completion", "prompt_tokens",
               "cached_tokens"]
    assert remote.trace[columns].equals(local.trace[columns])
    rows = remote.summary["replicas"]["per_replica"]
    assert remote.summary["replicas"]["cluster"] == "ray"
    assert [r["calls"] for r in rows] == [r["calls"] for r in
                                          local.summary["replicas"]["per_replica"]]
    assert remote.summary["modeled"]["modeled_makespan_s"] == pytest.approx(
        local.summary["modeled"]["modeled_makespan_s"])
    # The actors' memory events travel back with their results: the same memory log.
    ops = ["object", "op", "tier_from", "tier_to", "cause"]
    assert len(remote.memory) == len(local.memory) > 0
    assert remote.memory[ops].equals(local.memory[ops])
    assert not ray_instance.util.list_named_actors()  # nothing left behind


def test_a_killed_replica_fails_its_calls_and_the_run_continues(ray_instance, tmp_path):
    result = scalesim.simulate(killed("continue"), out=tmp_path)
    trace = result.trace.sort_values("request_id")
    failed = trace[trace["error"].notna()]
    # The agents homed on replica 1 had a call in flight there at t=2: it failed, naming it.
    assert len(failed) > 0 and set(failed["sim_time"]) == {2.0}
    assert failed["error"].str.contains("replica 1 died").all()
    assert result.summary["world"]["agent_errors"] == len(failed)
    # Their later calls went to replica 0 and succeeded; the run completed.
    later = trace[(trace["agent"].isin(failed["agent"])) & (trace["sim_time"] > 2)]
    assert len(later) == 2 * len(failed) and later["error"].isna().all()
    s = result.summary
    assert s["status"] == "completed"
    assert s["replicas"]["moved_agents"] == len(failed)
    assert s["replicas"]["per_replica"][1]["dead"].startswith("replica 1 died")


def test_a_killed_replica_stops_the_run_cleanly_with_fail(ray_instance, tmp_path):
    with pytest.raises(ReplicaFailure, match="replica 1 died"):
        scalesim.simulate(killed("fail"), out=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "replica 1 died" in summary["error"]
    run = scalesim.load_trace(tmp_path)
    failed = run.trace[run.trace["error"].notna()]
    assert len(failed) > 0 and failed["error"].str.contains("replica 1 died").all()


def test_ray_replicas_serve_calls_that_take_simulated_time(ray_instance, tmp_path):
    from tests.test_replicas import with_duration

    local = scalesim.simulate(with_duration(modeled(2), 30), out=tmp_path / "local")
    remote = scalesim.simulate(with_duration(modeled(2, cluster="ray"), 30),
                               out=tmp_path / "ray")
    columns = ["request_id", "agent", "sim_time", "due", "sim_time_done", "completion"]
    assert remote.trace[columns].equals(local.trace[columns])
    assert (remote.trace["sim_time_done"] == remote.trace["sim_time"] + 30).all()
    assert remote.summary["modeled"]["modeled_makespan_s"] == pytest.approx(
        local.summary["modeled"]["modeled_makespan_s"])
