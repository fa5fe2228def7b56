"""Engine replicas: what the Ray driver loop costs (measured), and how the modeled replicas scale.

Two parts:

1. **Ray overhead, measured here.** Two modeled replicas run as Ray actors on a Ray instance this
   script starts (2 CPUs). Timed on the driver, per engine iteration (one batched call to each
   replica and back): an empty iteration; iterations carrying the distance changes of 10,000
   and 100,000 agents (agent-id and key arrays, split by home replica) — round trip, and the
   share the replicas spent applying them; and per call: a batch of requests served to the end,
   the round trips minus the slowest replica's own step, divided by the calls. The same empty
   iteration in-process (``cluster: local``) is the baseline.
2. **Modeled scaling.** social_feed with ``--agents`` users (100,000) on 1, 2, 4 and 8 modeled
   GPUs (``--hardware``, qwen2.5-7b, rank-16 adapters and 1,024-token prefixes per agent, each
   replica with the same budget: a quarter of the whole working set), until ``--calls`` calls
   were submitted. Per replica count: the modeled makespan (the replicas step in lockstep, so
   each iteration costs the slowest replica's step), the scaling efficiency
   ``makespan(1) / (n * makespan(n))``, the utilization (the replicas' modeled compute over
   ``n * makespan``: what the lockstep barrier and idle replicas leave), the call imbalance
   (max/mean) and the driver's measured wall time per iteration.

The JSON headline has ``scaling_efficiency_8`` (modeled) and ``driver_overhead_ms`` (measured:
the Ray driver's time per iteration with two replicas, empty batches).

    python -m experiments.bench_replicas [--quick] [--agents N] [--calls N] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from experiments.modeled_sim import WORLDS, Setting, run_modeled, working_set, world_params
from experiments.results_dir import results_dir
from runtime.affinity import Affinity
from runtime.replica import ReplicaBatch, ReplicaResult
from runtime.replicas import Cluster, LocalCluster, engine_builder
from runtime.request import Request, SamplingParams

REPLICA_COUNTS = (1, 2, 4, 8)
#: The placeholder reply of every modeled call. The modeled chat picks a reply by request id,
#: and the ids of one instant's calls follow the order completions come back in, which depends
#: on how many replicas serve them: with several replies each replica count would run another
#: mix of posts and replies. One reply keeps the workload the same for every count.
REPLIES = ("post",)


def _builder() -> Any:
    return engine_builder("modeled", model="qwen2.5-7b", hardware_profile="H100",
                          policy="scalesim", lora_rank=16, output_tokens=8,
                          max_num_seqs=256, max_batch_tokens=8192)


def _time_iterations(cluster: Cluster, make: Any, reps: int) -> dict[str, float]:
    """Median wall ms of ``reps`` dispatches of ``make()`` and the replicas' own median ms."""
    walls, busy = [], []
    for _ in range(reps):
        batches = make()
        start = time.perf_counter()
        results = cluster.dispatch(batches)
        walls.append(time.perf_counter() - start)
        busy.append(max(r.busy_s for r in results.values() if isinstance(r, ReplicaResult)))
    return {"round_trip_ms": 1000 * statistics.median(walls),
            "replica_ms": 1000 * statistics.median(busy)}


def _distance_batches(agents: int, replicas: int, now: float) -> dict[int, ReplicaBatch]:
    affinity = Affinity(replicas)
    names = [f"user{i}" for i in range(agents)]
    keys = now + np.random.default_rng(0).exponential(60.0, agents)
    homes = np.array([affinity.home(a) for a in names])
    return {r: ReplicaBatch(now, [], [names[i] for i in np.flatnonzero(homes == r)],
                            keys[homes == r]) for r in range(replicas)}


def _per_call(cluster: Cluster, calls_per_replica: int, replicas: int) -> dict[str, float]:
    """Serve ``calls_per_replica`` requests on each replica to the end; driver ms per call."""
    affinity = Affinity(replicas)
    requests: dict[int, list[Request]] = {r: [] for r in range(replicas)}
    i = 0
    while any(len(v) < calls_per_replica for v in requests.values()):
        agent = f"agent{i}"
        home = affinity.home(agent)
        if len(requests[home]) < calls_per_replica:
            requests[home].append(Request(agent, "what now?", prefix=f"You are {agent}.",
                                          sampling=SamplingParams(max_tokens=8),
                                          request_id=i))
        i += 1
    batches = {r: ReplicaBatch(0.0, reqs) for r, reqs in requests.items()}
    done, overhead, iterations = 0, 0.0, 0
    while batches:
        start = time.perf_counter()
        results = cluster.dispatch(batches)
        wall = time.perf_counter() - start
        steps = [r for r in results.values() if isinstance(r, ReplicaResult)]
        overhead += wall - max(r.busy_s for r in steps)
        iterations += 1
        done += sum(len(r.result.finished) for r in steps)
        batches = {i: ReplicaBatch(0.0) for i, r in results.items()
                   if isinstance(r, ReplicaResult) and r.has_work}
    calls = replicas * calls_per_replica
    assert done == calls, (done, calls)
    return {"calls": calls, "iterations": iterations,
            "driver_ms_per_call": 1000 * overhead / calls,
            "driver_ms_per_iteration": 1000 * overhead / iterations}


def ray_overhead(quick: bool) -> dict[str, Any]:
    """Part 1: the measured Ray round trips (see the module docstring)."""
    import ray

    from runtime.ray_replica import RayCluster

    reps = 30 if quick else 200
    out: dict[str, Any] = {"replicas": 2}
    local = LocalCluster(2, _builder())
    out["local_empty"] = _time_iterations(local, lambda: {0: ReplicaBatch(0.0),
                                                          1: ReplicaBatch(0.0)}, reps)
    local.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cluster = RayCluster(2, _builder())
        try:
            out["ray_empty"] = _time_iterations(
                cluster, lambda: {0: ReplicaBatch(0.0), 1: ReplicaBatch(0.0)}, reps)
            for agents in (10_000, 100_000):
                out[f"ray_distances_{agents}"] = _time_iterations(
                    cluster, lambda: _distance_batches(agents, 2, 0.0), 5 if quick else 20)
            out["ray_per_call"] = _per_call(cluster, 64 if quick else 256, 2)
        finally:
            cluster.close()
    finally:
        ray.shutdown()
    return out


def modeled_scaling(agents: int, calls: int, hardware: str,
                    replies: tuple[str, ...] = REPLIES) -> list[dict[str, Any]]:
    """Part 2: the modeled makespan on 1, 2, 4 and 8 replicas (see the module docstring)."""
    setting = Setting(hardware=hardware)
    rows = []
    for n in REPLICA_COUNTS:
        r = run_modeled(WORLDS["social_feed"], world_params("social_feed", agents),
                        "scalesim", setting=setting, until=None, max_calls=calls, replicas=n,
                        memory_bytes=int(0.25 * working_set(setting, agents)), replies=replies)
        section = r.get("replicas") or {}
        row = {"replicas": n, "agents": agents, "calls": r["calls"],
               "modeled_makespan_s": r["modeled_makespan_s"],
               "modeled_stall_s": r["modeled_stall_s"],
               # the replicas' modeled compute over n times the makespan: 1 = never idle
               "utilization": r["modeled_compute_s"] / (n * r["modeled_makespan_s"]),
               "hit_rate": r["hits"] / max(1, r["hits"] + r["misses"]),
               "distinct_agents": len(set(r["order"])),
               "imbalance": section.get("imbalance", 1.0),
               "iterations": section.get("iterations"),
               "driver_ms_per_iteration": section.get("driver_overhead_ms"),
               "wall_s": r["wall_s"], "setup_s": r["setup_s"], "setting": r["setting"]}
        rows.append(row)
        print(f"{n} replicas: modeled makespan {row['modeled_makespan_s']:.1f} s, "
              f"{row['calls']} calls, imbalance {row['imbalance']:.3f}, hit rate "
              f"{row['hit_rate']:.3f}, wall {row['wall_s']:.1f} s", flush=True)
    base = rows[0]["modeled_makespan_s"]
    for row in rows:
        row["scaling_efficiency"] = base / (row["replicas"] * row["modeled_makespan_s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=60_000)
    parser.add_argument("--hardware", default="H100")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    agents = 5_000 if args.quick else args.agents
    calls = 5_000 if args.quick else args.calls
    overhead = {} if args.skip_ray else ray_overhead(args.quick)
    if overhead:
        print(json.dumps(overhead, indent=1))
    rows = modeled_scaling(agents, calls, args.hardware)
    import pandas as pd

    results = results_dir(args.quick)
    pd.DataFrame(rows).drop(columns=["setting"]).to_csv(results / "bench_replicas.csv",
                                                        index=False)
    (results / "bench_replicas_overhead.json").write_text(json.dumps(overhead, indent=1))
    print(pd.DataFrame(rows)[["replicas", "calls", "modeled_makespan_s", "scaling_efficiency",
                              "utilization", "imbalance", "hit_rate", "distinct_agents",
                              "iterations",
                              "driver_ms_per_iteration"]]
          .to_string(index=False))
    eight = next((r for r in rows if r["replicas"] == 8), rows[-1])
    print(json.dumps({
        "experiment": "bench_replicas", "modeled": "scaling only; overheads measured",
        "agents": agents, "calls": calls,
        "scaling_efficiency_8": round(eight["scaling_efficiency"], 3),
        "driver_overhead_ms": round(overhead["ray_empty"]["round_trip_ms"], 3)
        if overhead else None,
        "ray_ms_per_iteration_100k_distances":
            round(overhead["ray_distances_100000"]["round_trip_ms"], 2) if overhead else None,
        "ray_driver_ms_per_call": round(overhead["ray_per_call"]["driver_ms_per_call"], 4)
        if overhead else None}))


if __name__ == "__main__":
    main()
