"""The memory wall on this machine, measured: personas on an SSD under policies, on the real engine.

Every agent of a sparse-activation world (social_feed by default, or the town) has its own
random adapter and a long persona (about ``--persona-tokens`` tokens of prefix KV: ~46 KB a
token in float32). Their prefix KV plus adapters is about ``1 / --budget`` times the device
budget (RAM here, the engine's KV pool); there is no host tier, and what leaves the device goes
to disk: personas to the persistent store (``runtime.memory.kv_store``, direct I/O, checksummed),
adapters are re-read from their own files (direct I/O too, so the page cache is no hidden tier).
A load is then an SSD read, tens of milliseconds a persona, which a prefetch can hide behind the
running batch's forward pass, where a re-prefill costs seconds.

In one run, with one loaded model and the same world and seed:

1. ``build``: ``scalesim`` with an empty store (every persona is prefilled once and stored);
2. ``build again``: the same, now with the store warm (the second-run effect);
3. ``lru`` (its trace is belady's future), ``scalesim``, ``belady``, ``infinite`` (every object
   resident from the start, read from the store when the world declares its agents; its
   makespan excludes that preload);
4. ``recompute``: ``lru`` with no disk tier and no store, what a user without this project gets.

Printed per run: makespan, compute (inside forward passes), stall (waiting for loads), the
persona build time (forward-pass time apportioned to persona tokens by token count), hit rate,
bytes read from disk, and a final JSON headline with ``speedup_vs_lru``, ``slowdown_vs_infinite``,
``speedup_vs_recompute`` (of ``scalesim``), ``persona_build_ratio`` (build / build again) and
whether the same calls got the same greedy completions under the four policies that read
personas from the store (the builds compute them inside a forward pass with other rows, whose
float rounding differs, so their outputs may differ in places, and a social_feed trajectory
follows its outputs).

    .venv/bin/python experiments/bench_memory_wall.py            # about 10 minutes here
    .venv/bin/python experiments/bench_memory_wall.py --quick    # under 2 minutes

Everything here is measured on this machine; nothing is modeled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.bench_policies import (WORLDS, AdapterFeed, AdapterTown,  # noqa: E402,F401
                                        give_out_agent_memory)
from runtime import build_engine  # noqa: E402
from runtime.model.loader import load_hf_model  # noqa: E402
from scalesim import simulate  # noqa: E402
from scalesim.config import load_config  # noqa: E402
from scalesim.simulation import build_engine_for  # noqa: E402

QUICK = {"agents": 8, "persona_tokens": 300, "until": 660.0}


class StepClock:
    """Forward-pass seconds of an executor, and the share spent computing persona tokens."""

    def __init__(self, executor: Any) -> None:
        self.seconds = 0.0
        self.persona_s = 0.0
        self.persona_tokens = 0
        self.steps = 0
        execute = executor.execute

        def timed(batch: Any) -> None:
            tokens = sum(s.chunk for s in batch.seqs)
            persona = sum(max(0, min(s.num_computed + s.chunk, len(s.prefix_ids)) - s.num_computed)
                          for s in batch.seqs)
            start = time.perf_counter()
            try:
                execute(batch)
            finally:
                seconds = time.perf_counter() - start
                self.seconds += seconds
                self.steps += 1
                self.persona_tokens += persona
                self.persona_s += seconds * persona / max(1, tokens)

        executor.execute = timed


def run_one(name: str, policy: str, memory: dict[str, Any], args: argparse.Namespace,
            work: Path, hf: tuple[Any, Any]) -> dict[str, Any]:
    world_class, size_param, _ = WORLDS[args.world]
    params = {size_param: args.agents, "max_tokens": args.max_tokens}
    if args.world == "social_feed":
        params["active_rate"] = args.active_rate
    config = {"world": {"class": f"__main__:{world_class}", "params": params},
              "runtime": {"executor": "torch", "memory": {"policy": policy, **memory},
                          "max_num_seqs": 64, "kv_cache_tokens": args.kv_cache_tokens},
              "sim": {"until": args.until, "seed": 0}}
    engine = build_engine_for(load_config(config), hf_model=hf[0], tokenizer=hf[1])
    clock = StepClock(engine.executor)
    start = time.perf_counter()
    result = simulate(config, out=work / f"run-{name}", engine=engine)
    makespan = time.perf_counter() - start
    mem = result.summary["memory"]
    disk = mem.get("tiers", {}).get("disk", {})
    if policy == "infinite":
        makespan -= mem["preload_s"]  # the bound: resident from the start
    row = {"makespan_s": round(makespan, 2), "compute_s": round(clock.seconds, 2),
           "stall_s": mem["stall_s"], "persona_build_s": round(clock.persona_s, 2),
           "persona_tokens": clock.persona_tokens, "hit_rate": mem["hit_rate"],
           "disk_read_mb": round(disk.get("read_bytes", 0) / 1e6, 1),
           "disk_written_mb": round(disk.get("written_bytes", 0) / 1e6, 1),
           "preload_s": mem["preload_s"], "calls": result.summary["calls"],
           "iterations": clock.steps}
    print(f"{name:>12}: " + json.dumps(row), flush=True)
    calls = result.trace
    row["new_prompt_tokens"] = round(float((calls.prompt_tokens - calls.cached_tokens).mean()), 1)
    keys = zip(calls["agent"], calls["sim_time"], calls["prompt"])
    row["_outputs"] = dict(zip(keys, calls["completion"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="social_feed")
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--persona-tokens", type=int, default=1500)
    parser.add_argument("--until", type=float, default=1440.0, help="simulated minutes")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--active-rate", type=float, default=0.1,
                        help="social_feed: mean share of users acting per hour")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="device budget as a share of the agents' memory")
    parser.add_argument("--store", default=None, help="persistent store dir (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help=f"small: {QUICK}")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)

    hf = load_hf_model("smollm2-135m")
    ex = build_engine("torch", hf_model=hf[0], tokenizer=hf[1]).executor
    work = Path(tempfile.mkdtemp(prefix="bench-memory-wall-"))
    store = Path(args.store) if args.store else work / "store"
    shutil.rmtree(store, ignore_errors=True)
    one, prefix_tokens, prefix = give_out_agent_memory(
        ex, work, args.agents, args.rank, args.persona_tokens,
        "You are @user0, a social network user. You are curious. Keep posts short, in the "
        "first person.")
    working_set = (one + prefix) * args.agents
    device_bytes = int(working_set * args.budget)
    args.kv_cache_tokens = args.agents * (prefix_tokens + 256) + 8192
    print(f"{args.world}: {args.agents} agents, adapter {one / 2**20:.1f} MiB, persona "
          f"~{prefix_tokens} tokens = {prefix / 2**20:.1f} MiB of KV, working set "
          f"{working_set / 2**20:.0f} MiB, device budget {device_bytes / 2**20:.0f} MiB "
          f"({args.budget:.0%}); no host tier; store {store}", flush=True)

    disk = {"device_bytes": device_bytes, "host_bytes": 0, "kv_store": str(store),
            "disk_dir": str(work / "scratch")}
    runs: dict[str, dict[str, Any]] = {}
    runs["build"] = run_one("build", "scalesim", disk, args, work, hf)
    runs["build again"] = run_one("build again", "scalesim", disk, args, work, hf)
    # The measured policies run with the store complete (a run whose calls differ from the
    # build's may need a persona the build never computed; the second build stored it).
    runs["lru"] = run_one("lru", "lru", disk, args, work, hf)
    runs["scalesim"] = run_one("scalesim", "scalesim", disk, args, work, hf)
    runs["belady"] = run_one("belady", "belady",
                             {**disk, "belady_trace": str(work / "run-lru")}, args, work, hf)
    runs["infinite"] = run_one("infinite", "infinite", disk, args, work, hf)
    runs["recompute"] = run_one("recompute", "lru", {"device_bytes": device_bytes,
                                                     "host_bytes": 0}, args, work, hf)

    # The same call (agent, sim time, prompt) must get the same greedy completion under every
    # policy; whether the runs make the same calls at all is reported apart (in social_feed a
    # post is seen by whoever builds a prompt after it was written, which can depend on which
    # engine iteration finished it).
    outputs = {name: r.pop("_outputs") for name, r in runs.items()
               if name in ("lru", "scalesim", "belady", "infinite")}
    for r in runs.values():
        r.pop("_outputs", None)
    reference = outputs["lru"]
    identical = all(o == reference for o in outputs.values())
    same_call_same_output = all(o[k] == reference[k] for o in outputs.values()
                                for k in o.keys() & reference.keys())
    shared_calls = min(len(o.keys() & reference.keys()) for o in outputs.values())
    m = {name: r["makespan_s"] for name, r in runs.items()}
    headline = {"experiment": "bench_memory_wall", "world": args.world, "agents": args.agents,
                "persona_tokens": prefix_tokens, "budget": args.budget,
                "speedup_vs_lru": round(m["lru"] / m["scalesim"], 3),
                "slowdown_vs_infinite": round(m["scalesim"] / m["infinite"], 3),
                "lru_vs_infinite": round(m["lru"] / m["infinite"], 3),
                "speedup_vs_recompute": round(m["recompute"] / m["scalesim"], 3),
                "persona_build_ratio": round(runs["build"]["persona_build_s"]
                                             / max(1e-9, runs["build again"]["persona_build_s"]), 1),
                "second_run_wall_ratio": round(m["build"] / m["build again"], 3),
                "calls_identical": identical, "same_call_same_output": same_call_same_output,
                "calls_compared": shared_calls,
                "results": runs}
    print(json.dumps(headline))
    if args.keep:
        print(f"run directories kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
