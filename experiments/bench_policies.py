"""Memory policies side by side on the torch engine: agents with their own adapters and prefix KV.

In the town (default) or social_feed (``--world``), every agent gets its own random PEFT adapter
and a long persona (its prefix, padded with a backstory to about ``--persona-tokens`` tokens;
:class:`experiments.agent_memory.AgentOutfit`, handed to the world as ``world.params``).
Adapters and prefix KV share one device budget of about ``--budget`` of their working set (one
agent's adapter and persona KV as the engine's memory manager counts them); loads cross an emulated host-to-device link. By default the host tier holds every evicted prefix
(``--host-bytes``, default: the whole working set), so a miss is a copy; with ``--host-bytes 0``
an evicted prefix is dropped and the agent's next call re-prefills it, so a miss costs compute.

The same world and seed runs under ``lru`` (recorded first: its trace is belady's future),
``scalesim``, ``belady`` and ``infinite`` with one loaded model. Printed per policy: makespan
(wall seconds of the run), compute seconds (the forward passes the engine times), stall seconds
(waiting for loads), hit rate, bytes loaded, re-prefilled prefix tokens, engine iterations and
the mean number of sequences per iteration (a budget that holds a quarter of the agents' memory
also caps how many of their calls can run in one batch); then a final JSON line with
``speedup_vs_lru`` and ``slowdown_vs_infinite`` of ``scalesim``.

    .venv/bin/python experiments/bench_policies.py                 # 64 villagers, full day
    .venv/bin/python experiments/bench_policies.py --agents 16 --until 600 --max-tokens 4
    .venv/bin/python experiments/bench_policies.py --world social_feed --host-bytes 0

All numbers are measured on this machine; nothing here is modeled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.agent_memory import WORLDS, AgentOutfit  # noqa: E402
from experiments.harness import headline, measured_run  # noqa: E402
from runtime import build_engine  # noqa: E402
from runtime.model.loader import load_hf_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="town")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--until", type=float, default=None,
                        help="simulated minutes (default: town 1320, social_feed 1440)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.25, help="device share of the working set")
    parser.add_argument("--link-gbps", type=float, default=25.0)
    parser.add_argument("--policies", default="lru,scalesim,belady,infinite")
    parser.add_argument("--persona-tokens", type=int, default=400,
                        help="approximate prefix length of every villager")
    parser.add_argument("--host-bytes", type=int, default=None,
                        help="host tier for evicted prefixes (default: the working set; "
                             "0: drop and re-prefill)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    world_class, size_param, default_until = WORLDS[args.world]
    until = default_until if args.until is None else args.until
    if args.threads:
        torch.set_num_threads(args.threads)

    # One model load; each policy gets an engine of its own around the same weights.
    hf_model, tokenizer = load_hf_model("smollm2-135m")
    probe = build_engine("torch", hf_model=hf_model, tokenizer=tokenizer)
    architecture = probe.architecture()
    assert architecture is not None  # the torch engine knows its model's shapes
    work = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    outfit = AgentOutfit.write(work, architecture, args.agents, args.rank, args.persona_tokens)
    sizes = outfit.measure(probe, "You are Ada, 34, the baker of the village of Maple Hollow. "
                                  "You are cheerful. Answer briefly, in the first person.")
    probe.close()
    working_set = sizes.working_set(args.agents)
    device_bytes = int(working_set * args.budget)
    if args.host_bytes is None:
        args.host_bytes = working_set
    print(f"{args.world}: {args.agents} agents, adapter ~{sizes.adapter_bytes / 2**20:.1f} MiB, "
          f"prefix ~{sizes.persona_tokens} tokens ~{sizes.persona_bytes / 2**20:.1f} MiB, working "
          f"set {working_set / 2**20:.0f} MiB, device budget {device_bytes / 2**20:.0f} MiB "
          f"({args.budget:.0%}), link {args.link_gbps} GB/s, host tier for prefixes "
          f"{args.host_bytes} B", flush=True)

    results = {}
    for policy in args.policies.split(","):
        memory = {"policy": policy, "device_bytes": device_bytes, "link_gbps": args.link_gbps,
                  "host_bytes": args.host_bytes}
        if policy == "belady":
            memory["belady_trace"] = str(work / "run-lru")
        config = {"world": {"class": world_class,
                            "params": {size_param: args.agents, "max_tokens": args.max_tokens,
                                       **outfit.params()}},
                  "runtime": {"executor": "torch", "memory": memory, "max_num_seqs": 64,
                              "kv_cache_tokens": 32768},
                  "sim": {"until": until, "seed": 0}}
        run = measured_run(config, work / f"run-{policy}", hf_model=hf_model, tokenizer=tokenizer)
        summary, compute = run.result.summary, run.steps
        mem = summary["memory"]
        results[policy] = {"makespan_s": round(run.makespan_s, 2),
                           "compute_s": round(compute.seconds, 2),
                           "stall_s": mem["stall_s"], "calls": summary["calls"],
                           "hit_rate": mem["hit_rate"], "bytes_loaded": mem["bytes_loaded"],
                           "evictions": mem["evictions"],
                           "reprefill_tokens": summary["engine"]["reprefill_tokens"],
                           "iterations": compute.steps,
                           "mean_batch": round(compute.mean_batch, 2),
                           "kendall_tau": summary["distance"]["kendall_tau"]}
        print(policy, json.dumps(results[policy]), flush=True)

    line = {"experiment": "bench_policies", "world": args.world, "agents": args.agents}
    if "scalesim" in results and "lru" in results:
        line["speedup_vs_lru"] = round(results["lru"]["makespan_s"]
                                       / results["scalesim"]["makespan_s"], 3)
    if "scalesim" in results and "infinite" in results:
        line["slowdown_vs_infinite"] = round(results["scalesim"]["makespan_s"]
                                             / results["infinite"]["makespan_s"], 3)
    if "scalesim" in results and "belady" in results:
        line["extra_bytes_vs_belady"] = (results["scalesim"]["bytes_loaded"]
                                         - results["belady"]["bytes_loaded"])
    line["results"] = results
    headline(line)


if __name__ == "__main__":
    main()
