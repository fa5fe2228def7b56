"""Modeled makespan as the number of agents grows (100 -> 10,000), per policy and world.

The agent-memory budget is a fixed share of the device (``--budget-gb``, default 20 GB of the
H100's 80 GB), so more agents means a larger working set over the same budget. Each world runs its
busy stretch (:data:`~experiments.modeled_sim.BUSY_UNTIL`). Writes ``results/sweep_agents.csv`` / ``.png`` and a JSON line with
the scalesim-over-lru speedup at the largest size (modeled).

    python -m experiments.sweep_agents [--quick]
"""

from __future__ import annotations

import argparse

from experiments.modeled_sim import Setting, headline, run_policies, speedup, write_results

POLICIES = ["scalesim", "lru", "belady", "infinite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-gb", type=float, default=20.0)
    args = parser.parse_args()
    sizes = [100, 500] if args.quick else [100, 300, 1000, 3000, 10000]
    setting = Setting()
    rows = []
    for world in ("town", "social_feed"):
        for n in sizes:
            for r in run_policies(world, n, POLICIES, setting=setting, budget_fraction=None,
                                  memory_bytes=int(args.budget_gb * 1e9)):
                rows.append(r)
                print(f"{world:12s} {n:6d} {r['policy']:9s} calls {r['calls']:7d} modeled "
                      f"makespan {r['modeled_makespan_s']:9.2f} s stall "
                      f"{r['modeled_stall_s']:8.2f} s  (wall {r['wall_s']:.1f} s)", flush=True)
    df = write_results("sweep_agents", rows, "agents", panel="world", logx=True,
                       title=f"makespan vs agents, {args.budget_gb:g} GB agent-memory budget",
                       quick=args.quick)
    big = df[df.agents == max(sizes)]
    speed = {w: speedup(g) for w, g in big.groupby("world")}
    headline("sweep_agents", agents=max(sizes), speedup_vs_lru=speed, setting=setting.label())


if __name__ == "__main__":
    main()
