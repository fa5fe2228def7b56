"""Memory policies side by side: the town with one LoRA adapter per villager, on the torch engine.

Every villager gets its own random PEFT adapter; the device budget holds about a quarter of all
adapters, and loads cross an emulated host-to-device link. The same world (same seed, so the
same calls in the same order) runs under ``lru`` (recorded first: its trace is belady's future),
``scalesim``, ``belady`` and ``infinite`` with one loaded model. Printed per policy: makespan
(wall seconds of the run), adapter hit rate, bytes loaded, stall seconds; then ratios, and a
final JSON line with ``speedup_vs_lru`` and ``slowdown_vs_infinite`` of ``scalesim``.

    .venv/bin/python experiments/bench_policies.py                 # 64 villagers, full day
    .venv/bin/python experiments/bench_policies.py --agents 16 --until 600 --max-tokens 4

All numbers are measured on this machine; nothing here is modeled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import build_engine  # noqa: E402
from runtime.lora import module_shapes  # noqa: E402
from scalesim.run import run  # noqa: E402
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


class AdapterTown(Town):
    """The town, with villager ``i`` using adapter ``adapters[i % len(adapters)]``."""

    adapters: list[str] = []

    def setup(self, villagers: int = 8, max_tokens: int = 24) -> None:
        super().setup(villagers=villagers, max_tokens=max_tokens)
        for i, agent in enumerate(self.agents.values()):
            agent.adapter = self.adapters[i % len(self.adapters)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--until", type=float, default=1320)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.25, help="device share of the working set")
    parser.add_argument("--link-gbps", type=float, default=25.0)
    parser.add_argument("--policies", default="lru,scalesim,belady,infinite")
    args = parser.parse_args()

    engine = build_engine("torch", max_num_seqs=64, kv_cache_tokens=32768)
    work = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    AdapterTown.adapters = [random_adapter(work / f"adapter{i}", engine.executor.config,
                                           args.rank, i) for i in range(args.agents)]
    one = (Path(AdapterTown.adapters[0]) / "adapter_model.safetensors").stat().st_size
    working_set = one * args.agents
    device_bytes = int(working_set * args.budget)
    print(f"{args.agents} villagers, adapter ~{one / 2**20:.1f} MiB, working set "
          f"{working_set / 2**20:.0f} MiB, device budget {device_bytes / 2**20:.0f} MiB, "
          f"link {args.link_gbps} GB/s")

    results = {}
    for policy in args.policies.split(","):
        memory = {"policy": policy, "device_bytes": device_bytes, "link_gbps": args.link_gbps}
        if policy == "belady":
            memory["belady_trace"] = str(work / "run-lru")
        config = {"world": {"class": "__main__:AdapterTown",
                            "params": {"villagers": args.agents, "max_tokens": args.max_tokens}},
                  "runtime": {"executor": "torch", "memory": memory},
                  "sim": {"until": args.until, "seed": 0}}
        start = time.perf_counter()
        result = run(config, out=work / f"run-{policy}", engine=engine)
        makespan = time.perf_counter() - start
        mem = result.summary["memory"]
        results[policy] = {"makespan_s": round(makespan, 2), "calls": result.summary["calls"],
                           "hit_rate": mem["hit_rate"], "bytes_loaded": mem["bytes_loaded"],
                           "stall_s": mem["stall_s"],
                           "kendall_tau": result.summary["distance"]["kendall_tau"]}
        print(policy, json.dumps(results[policy]), flush=True)

    headline = {"experiment": "bench_policies", "agents": args.agents}
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
