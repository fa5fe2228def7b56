"""Memory policies side by side on the torch engine: agents with their own adapters and prefix KV.

In the town (default) or social_feed (``--world``), every agent gets its own random PEFT adapter
and a long persona (its prefix, padded with a backstory to about ``--persona-tokens`` tokens).
Adapters and prefix KV share one device budget of about ``--budget`` of their working set; loads
cross an emulated host-to-device link. By default the host tier holds every evicted prefix
(``--host-bytes``, default: the whole working set), so a miss is a copy; with ``--host-bytes 0``
an evicted prefix is dropped and the agent's next call re-prefills it, so a miss costs compute.

The same world and seed runs under ``lru`` (recorded first: its trace is belady's future),
``scalesim``, ``belady`` and ``infinite`` with one loaded model. Printed per policy: makespan
(wall seconds of the run), compute seconds (inside the executor's forward passes), stall seconds
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
import time
from typing import Any
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.step_timer import time_steps  # noqa: E402
from runtime import build_engine  # noqa: E402
from runtime.lora import load_adapter, module_shapes  # noqa: E402
from runtime.model.loader import load_hf_model  # noqa: E402
from scalesim import simulate as run  # noqa: E402
from scalesim.config import load_config  # noqa: E402
from scalesim.simulation import build_engine_for  # noqa: E402
from worlds.social_feed import SocialFeed  # noqa: E402
from worlds.town import Town  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_adapter(path: Path, config, rank: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_layers):
        for module in MODULES:
            fan_in, fan_out = shapes[module]
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(MODULES)}))
    return str(path)


BACKSTORY = ("You grew up in Maple Hollow, know every family on the market square, keep a diary "
             "of the weather and the harvest, and remember who owes whom a favour. ")


def long_persona(persona: str, tokens: int) -> str:
    """``persona`` followed by enough backstory sentences for about ``tokens`` tokens."""
    return persona + " " + BACKSTORY * max(0, tokens // 36)  # a sentence is ~36 tokens


#: What every agent gets, set by main() before the world is built: adapter paths (agent ``i``
#: uses ``i % len``) and the approximate persona length in tokens.
AGENT_MEMORY: dict = {"adapters": [], "persona_tokens": 0}


def give_agent_memory(world) -> None:
    """Give each agent of a set-up world its own adapter and a long persona."""
    adapters = AGENT_MEMORY["adapters"]
    for i, agent in enumerate(world.agents.values()):
        agent.adapter = adapters[i % len(adapters)]
        agent.persona = long_persona(agent.persona, AGENT_MEMORY["persona_tokens"])


def give_out_agent_memory(ex: Any, work: Path, agents: int, rank: int, persona_tokens: int,
                          sample: str) -> tuple[int, int, int]:
    """Write one random adapter per agent under ``work`` and set :data:`AGENT_MEMORY`; return
    the bytes of one adapter, and the tokens and KV bytes of a persona like ``sample``."""
    AGENT_MEMORY["adapters"] = [random_adapter(work / f"adapter{i}", ex.config, rank, i)
                                for i in range(agents)]
    AGENT_MEMORY["persona_tokens"] = persona_tokens
    adapter = load_adapter(AGENT_MEMORY["adapters"][0], ex.config, rank).nbytes
    prefix_tokens = len(ex.chat.encode(long_persona(sample, persona_tokens), "Hi")[0])
    return adapter, prefix_tokens, ex.cache.blocks_for(prefix_tokens) * ex.cache.block_nbytes


class AdapterTown(Town):
    """The town: bursts of calls at the schedule's hours (every villager stops at 9:00, 13:00...)."""

    def setup(self, villagers: int = 8, max_tokens: int = 24) -> None:
        super().setup(villagers=villagers, max_tokens=max_tokens)
        give_agent_memory(self)


class AdapterFeed(SocialFeed):
    """social_feed: each hour a different ~20% of the users acts, drawn ahead in the event queue."""

    def setup(self, users: int = 10, max_tokens: int = 24, active_rate: float = 0.2) -> None:
        super().setup(users=users, max_tokens=max_tokens, active_rate=active_rate)
        give_agent_memory(self)


#: world name -> (class, its size parameter, simulated minutes of a run)
WORLDS = {"town": ("AdapterTown", "villagers", 1320.0),
          "social_feed": ("AdapterFeed", "users", 1440.0)}


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
    ex = build_engine("torch", hf_model=hf_model, tokenizer=tokenizer).executor
    work = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    one, prefix_tokens, prefix = give_out_agent_memory(
        ex, work, args.agents, args.rank, args.persona_tokens,
        "You are Ada, 34, the baker of the village of Maple Hollow. You are cheerful. Answer "
        "briefly, in the first person.")
    working_set = (one + prefix) * args.agents
    device_bytes = int(working_set * args.budget)
    if args.host_bytes is None:
        args.host_bytes = working_set
    print(f"{args.world}: {args.agents} agents, adapter ~{one / 2**20:.1f} MiB, prefix ~{prefix_tokens} "
          f"tokens ~{prefix / 2**20:.1f} MiB, working set {working_set / 2**20:.0f} MiB, device "
          f"budget {device_bytes / 2**20:.0f} MiB ({args.budget:.0%}), link {args.link_gbps} GB/s, "
          f"host tier for prefixes {args.host_bytes} B", flush=True)

    results = {}
    for policy in args.policies.split(","):
        memory = {"policy": policy, "device_bytes": device_bytes, "link_gbps": args.link_gbps,
                  "host_bytes": args.host_bytes}
        if policy == "belady":
            memory["belady_trace"] = str(work / "run-lru")
        config = {"world": {"class": f"__main__:{world_class}",
                            "params": {size_param: args.agents, "max_tokens": args.max_tokens}},
                  "runtime": {"executor": "torch", "memory": memory, "max_num_seqs": 64,
                              "kv_cache_tokens": 32768},
                  "sim": {"until": until, "seed": 0}}
        engine = build_engine_for(load_config(config), hf_model=hf_model, tokenizer=tokenizer)
        ex = engine.executor
        compute = time_steps(ex)  # the executor's forward passes: seconds, steps, batch sizes
        start = time.perf_counter()
        result = run(config, out=work / f"run-{policy}", engine=engine)
        makespan = time.perf_counter() - start
        mem = result.summary["memory"]
        results[policy] = {"makespan_s": round(makespan, 2), "compute_s": round(compute.seconds, 2),
                           "stall_s": mem["stall_s"], "calls": result.summary["calls"],
                           "hit_rate": mem["hit_rate"], "bytes_loaded": mem["bytes_loaded"],
                           "evictions": mem["evictions"],
                           "reprefill_tokens": ex.reprefill_tokens,
                           "iterations": compute.steps,
                           "mean_batch": round(compute.mean_batch, 2),
                           "kendall_tau": result.summary["distance"]["kendall_tau"]}
        print(policy, json.dumps(results[policy]), flush=True)

    headline = {"experiment": "bench_policies", "world": args.world, "agents": args.agents}
    if "scalesim" in results and "lru" in results:
        headline["speedup_vs_lru"] = round(results["lru"]["makespan_s"]
                                           / results["scalesim"]["makespan_s"], 3)
    if "scalesim" in results and "infinite" in results:
        headline["slowdown_vs_infinite"] = round(results["scalesim"]["makespan_s"]
                                                 / results["infinite"]["makespan_s"], 3)
    if "scalesim" in results and "belady" in results:
        headline["extra_bytes_vs_belady"] = (results["scalesim"]["bytes_loaded"]
                                             - results["belady"]["bytes_loaded"])
    headline["results"] = results
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
