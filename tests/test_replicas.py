"""Engine replicas in-process (``runtime.cluster: local``): affinity, the driver loop, distances
per replica, the summary, and the one-line error for a missing Ray."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

import scalesim
from runtime import build_engine
from runtime.affinity import Affinity, stable_hash
from runtime.replica import ReplicaBatch, ReplicaDied
from runtime.replica_distances import ReplicaDistances
from runtime.replicas import LocalCluster, ReplicaFailure, ReplicaSet, build_replicas
from scalesim.config import ConfigError, load_config
from scalesim.simulation import Simulation
from tests.conftest import EchoExecutor

CALLERS = {"world": {"class": "tests.replica_worlds:Callers", "params": {"agents": 6}},
           "sim": {"until": 10}}


def echo_replicas(n: int) -> ReplicaSet:
    return build_replicas(n, lambda: build_engine(EchoExecutor()))


def modeled(replicas: int, users: int = 60, **extra: object) -> dict:
    return {"world": {"class": "worlds.social_feed:SocialFeed",
                      "params": {"users": users, "seed_posts": 3, "max_tokens": 8}},
            "runtime": {"executor": "modeled", "model": "qwen2.5-7b", "replicas": replicas,
                        "memory": {"policy": "scalesim", "device_bytes": 60_000_000,
                                   "host_bytes": 0},
                        "modeled": {"lora_rank": 8, "replies": ["post hello", "skip"]},
                        **extra},
            "sim": {"until": 600, "seed": 3}}


def test_stable_homes_are_spread_and_placement_wins():
    affinity = Affinity(4)
    homes = [affinity.home(f"user{i}") for i in range(4000)]
    counts = np.bincount(homes, minlength=4)
    assert counts.min() > 900  # names differing in one character still spread
    assert [Affinity(4).home(f"user{i}") for i in range(50)] == homes[:50]
    assert stable_hash("user7") == stable_hash("user7")
    affinity.place("user5", 3)
    assert affinity.home("user5") == 3
    with pytest.raises(ValueError, match="out of range"):
        affinity.place("x", 4)


def test_fail_over_moves_only_the_dead_replicas_agents():
    affinity = Affinity(3)
    before = {f"a{i}": affinity.home(f"a{i}") for i in range(300)}
    affinity.fail_over(1)
    after = {a: affinity.home(a) for a in before}
    assert all(after[a] == h for a, h in before.items() if h != 1)
    assert {after[a] for a, h in before.items() if h == 1} <= {0, 2}
    assert affinity.moved == {a for a, h in before.items() if h == 1}


def test_every_agents_calls_land_on_its_home_replica(tmp_path):
    engine = echo_replicas(3)
    result = scalesim.simulate(CALLERS, out=tmp_path, engine=engine)
    assert result.summary["status"] == "completed" and len(result.trace) == 18
    agent_of = dict(zip(result.trace["request_id"], result.trace["agent"]))
    assert isinstance(engine.cluster, LocalCluster)
    seen = set()
    for i, replica in enumerate(engine.cluster.replicas):
        executor = replica.engine.executor
        assert isinstance(executor, EchoExecutor)
        for request_id in executor.validated:
            assert engine.home(agent_of[request_id]) == i
            seen.add(request_id)
    assert seen == set(agent_of)
    rows = result.summary["replicas"]["per_replica"]
    assert sum(r["calls"] for r in rows) == 18
    assert [r["calls"] for r in rows] == [
        3 * sum(engine.home(f"c{a}") == i for a in range(6)) for i in range(3)]
    calls = [r["calls"] for r in rows]
    assert result.summary["replicas"]["imbalance"] == round(max(calls) / (18 / 3), 4)


def test_replicas_reply_as_one_engine_and_apply_completions_in_request_id_order(tmp_path):
    one = scalesim.simulate(CALLERS, out=tmp_path / "one", engine=build_engine(EchoExecutor()))
    engine = echo_replicas(2)
    order: list[int] = []
    sim = Simulation(load_config(CALLERS), engine=engine)
    sim.env.completion_listeners.append(lambda call, done: order.append(done.request_id))
    sim.run()
    assert order and all(a < b for a, b in zip(order, order[1:]))
    two = scalesim.simulate(CALLERS, out=tmp_path / "two", engine=echo_replicas(2))
    columns = ["request_id", "agent", "sim_time", "prompt", "completion"]
    assert two.trace[columns].equals(one.trace[columns])


def test_a_world_may_place_its_agents(tmp_path):
    cfg = {**CALLERS, "world": {"class": "tests.replica_worlds:Callers",
                                "params": {"agents": 6, "place": 1}}}
    result = scalesim.simulate(cfg, out=tmp_path, engine=echo_replicas(2))
    rows = result.summary["replicas"]["per_replica"]
    assert [r["calls"] for r in rows] == [0, 18]
    assert result.summary["replicas"]["imbalance"] == 2.0


def test_each_replica_sees_the_oracles_distances_of_its_own_agents():
    sim = Simulation(load_config(modeled(2)), record=False)
    engine = sim.engine
    assert isinstance(engine, ReplicaSet) and isinstance(engine.cluster, LocalCluster)
    sim.run(until=300)
    oracle = sim.oracle
    assert oracle is not None
    assert engine.feed is not None
    checked = 0
    for i, replica in enumerate(engine.cluster.replicas):
        # What is still queued travels with the replica's next call: send it now.
        replica.step(ReplicaBatch(float(sim.env.now), [], *engine.feed.take(i)))
        distances = replica.distances
        assert replica.engine.memory is not None
        assert replica.engine.memory.distance is distances
        for agent in sim.world.agents if sim.world else {}:
            if engine.home(agent) != i or distances.distance(agent) == 0.0:
                continue
            assert distances.order_key(agent) == oracle.order_key(agent)
            checked += 1
        assert all(engine.home(a) == i for a in distances.nearest(10))
    assert checked > 40


def test_replica_distances_put_requests_in_flight_first():
    d = ReplicaDistances()
    changed: list[str] = []
    d.watch(changed.append)
    d.update(10.0, ["a", "b", "c"], np.array([30.0, 12.0, math.inf]))
    assert d.nearest(3) == ["b", "a"]
    assert d.distance("a") == 20.0 and d.distance("c") == math.inf
    d.on_submit("a")
    assert d.nearest(2) == ["a", "b"] and d.distance("a") == 0.0
    assert d.order_key("a") == -math.inf
    d.on_finish("a")
    d.update(11.0, ["b"], np.array([math.inf]))
    assert d.nearest(3) == ["a"] and changed == ["a", "b", "c", "a", "a", "b"]


def test_modeled_replicas_report_per_replica_numbers(tmp_path):
    result = scalesim.simulate(modeled(4), out=tmp_path)
    s = result.summary
    assert s["status"] == "completed"
    section = s["replicas"]
    assert section["count"] == 4 and section["cluster"] == "local"
    rows = section["per_replica"]
    assert sum(r["calls"] for r in rows) == s["calls"] > 0
    assert all(r["calls"] > 0 and r["hit_rate"] is not None for r in rows)
    assert sum(r["bytes_loaded"] for r in rows) == s["modeled"]["bytes_loaded"]
    # Lockstep: the set's makespan is at least its slowest replica's, at most their sum.
    each = s["modeled"]["replica_makespan_s"]
    assert max(each) <= s["modeled"]["modeled_makespan_s"] <= sum(each) + 1e-9
    assert len(result.memory) > 0  # in-process replicas record their memory operations


def test_cluster_ray_without_ray_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError) as info:
        Simulation(load_config(modeled(2, cluster="ray")))
    message = str(info.value)
    assert "\n" not in message and "scalesim[ray]" in message and "runtime.cluster" in message


def test_replica_keys_are_checked():
    with pytest.raises(ConfigError, match="runtime.replicas"):
        load_config(modeled(0))
    with pytest.raises(ConfigError, match="runtime.on_replica_failure"):
        load_config(modeled(2, on_replica_failure="retry"))


def test_bench_replicas_parts_run_small():
    from experiments import bench_replicas as bench

    rows = bench.modeled_scaling(300, 200, "H100")
    assert [r["replicas"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["scaling_efficiency"] == 1.0
    for r in rows:
        assert r["calls"] == 200 and 0 < r["utilization"] <= 1.0 + 1e-9
        assert r["scaling_efficiency"] == pytest.approx(
            rows[0]["modeled_makespan_s"] / (r["replicas"] * r["modeled_makespan_s"]))
    cluster = LocalCluster(2, bench._builder())
    out = bench._per_call(cluster, 8, 2)
    cluster.close()
    assert out["calls"] == 16 and out["iterations"] >= 2


class DyingCluster(LocalCluster):
    """In-process replicas, of which ``dies`` answers as dead from iteration ``at`` on."""

    def __init__(self, replicas: int, dies: set[int], at: int) -> None:
        super().__init__(replicas, lambda: build_engine(EchoExecutor()))
        self.dies, self.at, self.calls = dies, at, 0

    def dispatch(self, batches):
        self.calls += 1
        out = super().dispatch({i: b for i, b in batches.items()
                                if not (i in self.dies and self.calls >= self.at)})
        for i in batches:
            if i in self.dies and self.calls >= self.at:
                out[i] = ReplicaDied(i, "lost in a test")
        return out


def test_continue_moves_the_dead_replicas_agents_and_fails_when_none_is_left(tmp_path):
    engine = ReplicaSet(DyingCluster(2, {1}, at=3), on_failure="continue")
    result = scalesim.simulate(CALLERS, out=tmp_path / "one", engine=engine)
    failed = result.trace[result.trace["error"].notna()]
    assert len(failed) > 0 and failed["error"].str.contains("replica 1 died").all()
    assert result.summary["status"] == "completed"
    assert result.summary["replicas"]["moved_agents"] == len(set(failed["agent"]))
    assert all(engine.home(a) == 0 for a in failed["agent"])
    later = result.trace[result.trace["agent"].isin(failed["agent"])
                         & (result.trace["sim_time"] > failed["sim_time"].max())]
    assert len(later) > 0 and later["error"].isna().all()  # served on replica 0
    everyone = ReplicaSet(DyingCluster(2, {0, 1}, at=2), on_failure="continue")
    with pytest.raises(ReplicaFailure, match="died"):
        scalesim.simulate(CALLERS, out=tmp_path / "none", engine=everyone)
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["status"] == "failed"


# -- the replica set is the whole engine interface -----------------------------------------------

def _modeled_set(replicas: int = 2) -> ReplicaSet:
    return build_replicas(replicas, lambda: build_engine(
        "modeled", model="smollm2-135m", policy="lru", lora_rank=8, output_tokens=4,
        replies=("hi there",)))


def test_a_replica_set_cancels_queued_and_running_requests():
    from runtime import Request, SamplingParams

    engine = _modeled_set()
    queued = engine.submit(Request("ann", "hello", prefix="You are Ann."))
    running = engine.submit(Request("bob", "hello", prefix="You are Bob.",
                                    sampling=SamplingParams(max_tokens=4)))
    assert engine.cancel(queued, "client left")  # still on the driver: failed at once
    first = engine.step()
    assert [(c.request_id, c.error) for c in first.finished] == [(queued, "client left")]
    assert first.running == 1
    assert engine.cancel(running, "gone too") and not engine.cancel(999)
    done = engine.step().finished
    assert [(c.request_id, c.error) for c in done] == [(running, "gone too")]
    assert not engine.has_work()
    engine.close()


def test_a_replica_set_declares_agents_on_their_home_and_reports_events():
    from runtime.interface import StepTimed
    from runtime.memory.events import MemoryEvent
    from runtime import Request

    engine = _modeled_set()
    assert isinstance(engine.cluster, LocalCluster)
    events: list = []
    engine.listen(events.append)
    agents = [f"agent{i}" for i in range(6)]
    for agent in agents:
        engine.declare(agent, f"You are {agent}, a long-winded baker of the town.")
    engine.tick()
    for agent in agents:
        home = engine.cluster.replicas[engine.home(agent)].engine
        assert f"adapter:{agent}" in home.memory.objects
        others = [r.engine for r in engine.cluster.replicas if r.engine is not home]
        assert all(f"adapter:{agent}" not in o.memory.objects for o in others)
    request = Request("agent0", "What now?", prefix="You are agent0.", stream=True)
    rid = engine.submit(request)
    partial = {}
    while engine.has_work():
        result = engine.step()
        partial.update(result.partial)
        assert result.modeled_s is not None and result.modeled_s >= 0
    assert rid in partial and partial[rid]
    steps = [e for e in events if isinstance(e, StepTimed)]
    assert steps and {e.replica for e in steps} == {engine.home("agent0")}
    assert any(isinstance(e, MemoryEvent) and e.object == "adapter:agent0" for e in events)
    assert engine.policy_name == "lru" and not engine.uses_distance
    assert engine.clock.modeled and engine.clock.now() > 0
    assert engine.prompt_tokens("You are agent0.", "What now?") > 0
    engine.close()


def with_duration(config: dict, duration: float) -> dict:
    return {**config, "sim": {**config["sim"], "call_duration": duration}}


def test_replicas_serve_calls_that_take_simulated_time_as_one_engine_does(tmp_path):
    # The due time travels with each request to its replica; the agents resume at it, and a
    # replica set gives every call the reply and the times one engine gives.
    one = scalesim.simulate(with_duration(modeled(1), 30), out=tmp_path / "one")
    two = scalesim.simulate(with_duration(modeled(2), 30), out=tmp_path / "two")
    columns = ["agent", "sim_time", "due", "sim_time_done", "prompt", "completion"]
    key = ["agent", "sim_time", "prompt"]
    assert len(two.trace) > 20 and two.trace["error"].isna().all()
    assert (two.trace["due"] == two.trace["sim_time"] + 30).all()
    assert (two.trace["sim_time_done"] == two.trace["due"]).all()
    assert two.trace.sort_values(key)[columns].reset_index(drop=True).equals(
        one.trace.sort_values(key)[columns].reset_index(drop=True))
    assert two.summary["occupancy"]["sequences_per_step"] > 1
