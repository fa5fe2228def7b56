"""Modeled makespan as the share of active agents per step grows from 5% to 100%.

social_feed's ``active_rate`` sets how many users act in each hourly step; the agent-memory
budget is a quarter of the working set. Writes ``results/sweep_sparsity.csv`` / ``.png`` and a
JSON line with the scalesim-over-lru speedup at each rate (modeled).

    python -m experiments.sweep_sparsity [--quick]
"""

from __future__ import annotations

from experiments.modeled_sim import (Setting, experiment_parser, headline, run_policies, speedup,
                                     write_results)

POLICIES = ["scalesim", "lru", "infinite"]


def main() -> None:
    parser = experiment_parser(__doc__, agents=500)
    args = parser.parse_args()
    agents = 150 if args.quick else args.agents
    rates = [0.05, 0.5] if args.quick else [0.05, 0.1, 0.2, 0.4, 0.7, 1.0]
    setting, rows = Setting(), []
    for rate in rates:
        for r in run_policies("social_feed", agents, POLICIES, setting=setting,
                              budget_fraction=0.25, active=rate,
                              until=480.0 if args.quick else 720.0):
            r["active_rate"] = rate
            rows.append(r)
            print(f"{rate:4.2f} {r['policy']:9s} calls {r['calls']:6d} modeled makespan "
                  f"{r['modeled_makespan_s']:8.2f} s", flush=True)
    df = write_results("sweep_sparsity", rows, "active_rate",
                       title=f"social_feed, {agents} users: makespan vs active share",
                       quick=args.quick)
    speed = {str(rate): speedup(g) for rate, g in df.groupby("active_rate")}
    headline("sweep_sparsity", agents=agents, speedup_vs_lru=speed, setting=setting.label())


if __name__ == "__main__":
    main()
