"""Modeled makespan as the working set grows from 1x to 8x the agent-memory budget.

One world size (``--agents``, default 1000 social_feed users); the budget is the working set
divided by the ratio. Writes ``results/sweep_memory.csv`` / ``.png`` and a JSON line with the
scalesim-over-lru speedup at 8x (modeled). Evicted prefix KV is dropped (a miss re-prefills it);
with ``--prefix-on-host`` it is kept in host memory (a miss is a copy) and the results go to
``results/sweep_memory_host.*``.

    python -m experiments.sweep_memory [--quick] [--prefix-on-host]
"""

from __future__ import annotations

from experiments.modeled_sim import (Setting, experiment_parser, headline, run_policies, speedup,
                                     write_results)

POLICIES = ["scalesim", "lru", "belady", "infinite"]


def main() -> None:
    parser = experiment_parser(__doc__, agents=1000)
    parser.add_argument("--world", default="social_feed")
    parser.add_argument("--prefix-on-host", action="store_true",
                        help="keep evicted prefix KV in host memory (results/sweep_memory_host.*)")
    args = parser.parse_args()
    agents = 200 if args.quick else args.agents
    ratios = [1, 4, 8] if args.quick else [1, 2, 4, 6, 8]
    setting, rows = Setting(prefix_on_host=args.prefix_on_host), []
    for ratio in ratios:
        for r in run_policies(args.world, agents, POLICIES, setting=setting,
                              budget_fraction=1.0 / ratio,
                              until=720.0 if args.quick else -1.0):
            r["working_set_over_budget"] = ratio
            rows.append(r)
            print(f"{ratio}x {r['policy']:9s} modeled makespan {r['modeled_makespan_s']:8.2f} s "
                  f"stall {r['modeled_stall_s']:7.2f} s", flush=True)
    name = "sweep_memory_host" if args.prefix_on_host else "sweep_memory"
    df = write_results(name, rows, "working_set_over_budget",
                       title=f"{args.world}, {agents} agents: makespan vs working set / budget",
                       quick=args.quick)
    headline(name, world=args.world, agents=agents, ratio=max(ratios),
             speedup_vs_lru=speedup(df[df.working_set_over_budget == max(ratios)]),
             setting=setting.label())


if __name__ == "__main__":
    main()
