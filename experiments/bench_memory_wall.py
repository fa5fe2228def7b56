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
persona build time (forward-pass time apportioned to persona tokens by token count, the tokens
known from the memory events of persona KV recomputed: :class:`PersonaBuild`), hit rate,
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
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.agent_memory import WORLDS, AgentOutfit  # noqa: E402
from experiments.harness import headline, measured_run  # noqa: E402
from runtime import build_engine  # noqa: E402
from runtime.interface import EngineEvent, StepTimed  # noqa: E402
from runtime.kv_cache import KV_CACHE_DTYPES  # noqa: E402
from runtime.memory.events import MemoryEvent  # noqa: E402
from runtime.model.loader import load_hf_model  # noqa: E402

QUICK = {"agents": 8, "persona_tokens": 300, "until": 660.0}


class PersonaBuild:
    """Forward-pass seconds spent computing personas, apportioned by token count.

    A call whose persona must be computed makes the memory manager report the persona's KV
    segment recomputed (a ``recompute`` :class:`MemoryEvent`, as the call is admitted, when the
    prefix cache still had it) or computed for the first time (``compute``, cause ``persona``,
    once the call's prompt is done: then the next prefill tokens are counted in its place, an
    approximation of when); the persona's tokens are then the first its call computes. So while persona tokens are pending,
    a timed step's prefill tokens count as persona tokens, and the step's seconds are shared
    between its tokens by count. Pending tokens come from the KV object's bytes, i.e. rounded up
    to whole KV blocks; when several calls prefill in one step, one's prompt tokens may count
    for another's persona, which then counts as prompt: the total is what the personas took.
    """

    def __init__(self, kv_bytes_per_token: int) -> None:
        self.kv_bytes_per_token = kv_bytes_per_token
        self.seconds = 0.0
        self.tokens = 0
        self._pending = 0

    def __call__(self, event: EngineEvent) -> None:
        if isinstance(event, MemoryEvent):
            if event.kind == "prefix_kv" and (event.op == "recompute" or (
                    event.op == "compute" and event.cause == "persona")):
                self._pending += event.bytes // self.kv_bytes_per_token
        elif isinstance(event, StepTimed) and self._pending and event.tokens:
            persona = min(self._pending, event.prefill_tokens)
            self._pending -= persona
            self.tokens += persona
            self.seconds += event.wall_s * persona / event.tokens


def run_one(name: str, policy: str, memory: dict[str, Any], args: argparse.Namespace,
            outfit: AgentOutfit, work: Path, hf: tuple[Any, Any],
            kv_bytes_per_token: int) -> dict[str, Any]:
    world_class, size_param, _ = WORLDS[args.world]
    params = {size_param: args.agents, "max_tokens": args.max_tokens, **outfit.params()}
    if args.world == "social_feed":
        params["active_rate"] = args.active_rate
    runtime = {"executor": "torch", "memory": {"policy": policy, **memory},
               "max_num_seqs": 64, "kv_cache_tokens": args.kv_cache_tokens,
               "model": args.model, "device": args.device, "dtype": args.dtype,
               "random_weights": args.random_weights, "attention": args.attention,
               "kv_cache_dtype": args.kv_cache_dtype}
    config = {"world": {"class": world_class, "params": params}, "runtime": runtime,
              "sim": {"until": args.until, "seed": 0}}
    persona = PersonaBuild(kv_bytes_per_token)
    run = measured_run(config, work / f"run-{name}", [persona], hf_model=hf[0], tokenizer=hf[1])
    result, makespan = run.result, run.makespan_s
    mem = result.summary["memory"]
    disk = mem.get("tiers", {}).get("disk", {})
    if policy == "infinite":
        makespan -= mem["preload_s"]  # the bound: resident from the start
    row = {"makespan_s": round(makespan, 2), "compute_s": round(run.steps.seconds, 2),
           "stall_s": mem["stall_s"], "persona_build_s": round(persona.seconds, 2),
           "persona_tokens": persona.tokens, "hit_rate": mem["hit_rate"],
           "disk_read_mb": round(disk.get("read_bytes", 0) / 1e6, 1),
           "disk_written_mb": round(disk.get("written_bytes", 0) / 1e6, 1),
           "loaded_mb": round(mem.get("bytes_loaded", 0) / 1e6, 1),
           "copy_s": mem.get("copy_s", 0.0), "preload_s": mem["preload_s"], "calls": result.summary["calls"],
           "iterations": run.steps.steps}
    print(f"{name:>12}: " + json.dumps(row), flush=True)
    calls = result.trace
    row["new_prompt_tokens"] = round(float((calls.prompt_tokens - calls.cached_tokens).mean()), 1)
    keys = zip(calls["agent"], calls["sim_time"], calls["prompt"])
    row["_outputs"] = dict(zip(keys, calls["completion"]))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    parser.add_argument("--tier", choices=("disk", "host"), default="disk",
                        help="where evicted memory goes: the SSD and the persistent store "
                             "(default), or the host tier (pinned RAM on CUDA: a GPU's setting)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attention", default="auto", choices=("auto", "torch", "cpu", "flashinfer"))
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="the KV pool's rows: the model's dtype (auto) or int8")
    parser.add_argument("--device-mib", type=float, default=None,
                        help="the device budget in MiB (instead of --budget's share of the "
                             "working set): the same bytes for runs whose KV formats differ")
    parser.add_argument("--random-weights", action="store_true",
                        help="the profile --model with random weights (text as bytes): any "
                             "shape on any device, no model files")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)

    engine_kw = {"model": args.model, "device": args.device, "dtype": args.dtype,
                 "kv_cache_dtype": args.kv_cache_dtype}
    if args.random_weights:
        hf: tuple[Any, Any] = (None, None)
        probe = build_engine("torch", random_weights=True, **engine_kw)
    else:
        hf = load_hf_model(args.model, dtype=args.dtype, device=args.device)
        probe = build_engine("torch", hf_model=hf[0], tokenizer=hf[1], **engine_kw)
    architecture = probe.architecture()
    assert architecture is not None  # the torch engine knows its model's shapes
    # What a token of KV weighs in this run's pool (its dtype, or int8 rows with their scales).
    kv_token_bytes = probe.executor.cache.block_nbytes // probe.executor.cache.block_size
    work = Path(tempfile.mkdtemp(prefix="bench-memory-wall-"))
    store = Path(args.store) if args.store else work / "store"
    shutil.rmtree(store, ignore_errors=True)
    outfit = AgentOutfit.write(work, architecture, args.agents, args.rank, args.persona_tokens)
    sizes = outfit.measure(probe, "You are @user0, a social network user. You are curious. Keep "
                                  "posts short, in the first person.")
    probe.close()
    prefix_tokens = sizes.persona_tokens
    working_set = sizes.working_set(args.agents)
    device_bytes = (int(args.device_mib * 2**20) if args.device_mib is not None
                    else int(working_set * args.budget))
    args.budget = device_bytes / working_set
    args.kv_cache_tokens = args.agents * (prefix_tokens + 256) + 8192
    print(f"{args.world}: {args.agents} agents, adapter {sizes.adapter_bytes / 2**20:.1f} MiB, "
          f"persona ~{prefix_tokens} tokens = {sizes.persona_bytes / 2**20:.1f} MiB of KV, "
          f"working set {working_set / 2**20:.0f} MiB, device budget "
          f"{device_bytes / 2**20:.0f} MiB ({args.budget:.0%}); "
          + (f"no host tier; store {store}" if args.tier == "disk" else
             f"host tier {2 * working_set / 2**20:.0f} MiB"), flush=True)

    disk = {"device_bytes": device_bytes, "host_bytes": 0, "kv_store": str(store),
            "disk_dir": str(work / "scratch")}
    kv_bytes_per_token = kv_token_bytes

    def run(name: str, policy: str, memory: dict[str, Any]) -> dict[str, Any]:
        return run_one(name, policy, memory, args, outfit, work, hf, kv_bytes_per_token)

    runs: dict[str, dict[str, Any]] = {}
    if args.tier == "host":
        return host_tier(args, run, device_bytes, 2 * working_set, prefix_tokens, work)
    runs["build"] = run("build", "scalesim", disk)
    runs["build again"] = run("build again", "scalesim", disk)
    # The measured policies run with the store complete (a run whose calls differ from the
    # build's may need a persona the build never computed; the second build stored it).
    runs["lru"] = run("lru", "lru", disk)
    runs["scalesim"] = run("scalesim", "scalesim", disk)
    runs["belady"] = run("belady", "belady", {**disk, "belady_trace": str(work / "run-lru")})
    runs["infinite"] = run("infinite", "infinite", disk)
    runs["recompute"] = run("recompute", "lru", {"device_bytes": device_bytes, "host_bytes": 0})

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
    line = headline({"experiment": "bench_memory_wall", "world": args.world, "agents": args.agents,
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
              "results": runs})
    if args.keep:
        print(f"run directories kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return line


def host_tier(args: argparse.Namespace, run: Any, device_bytes: int, host_bytes: int,
              prefix_tokens: int, work: Path) -> dict[str, Any]:
    """The policies with a host tier that holds every agent's memory: what leaves the device is
    copied to host RAM (pinned on CUDA, loads on the copy stream) and back when needed."""
    host = {"device_bytes": device_bytes, "host_bytes": host_bytes}
    runs = {"lru": run("lru", "lru", host), "scalesim": run("scalesim", "scalesim", host),
            "belady": run("belady", "belady", {**host, "belady_trace": str(work / "run-lru")}),
            "infinite": run("infinite", "infinite", host),
            "recompute": run("recompute", "lru", {"device_bytes": device_bytes, "host_bytes": 0})}
    for r in runs.values():
        r.pop("_outputs", None)
    m = {name: r["makespan_s"] for name, r in runs.items()}
    line = headline({"experiment": "bench_memory_wall", "tier": "host", "world": args.world,
                     "model": args.model, "device": args.device, "dtype": args.dtype,
                     "agents": args.agents, "persona_tokens": prefix_tokens, "budget": args.budget,
                     "speedup_vs_lru": round(m["lru"] / m["scalesim"], 3),
                     "slowdown_vs_infinite": round(m["scalesim"] / m["infinite"], 3),
                     "speedup_vs_recompute": round(m["recompute"] / m["scalesim"], 3),
                     "results": runs})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return line


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
