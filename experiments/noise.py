"""How wrong may the distances be? Multiplicative noise on every distance, 0 -> 100%.

Whenever an agent's estimate changes, its horizon (estimated call time minus now) is multiplied by
``max(0, 1 + noise * N(0, 1))`` and kept until the next change (see NoisyDistance). The JSON line
names the smallest noise level at which scalesim no longer beats lru (modeled).

    python -m experiments.noise [--quick]
"""

from __future__ import annotations

from experiments.modeled_sim import Setting, experiment_parser, headline, run_world, write_results


def main() -> None:
    parser = experiment_parser(__doc__, agents=1000)
    args = parser.parse_args()
    agents = 200 if args.quick else args.agents
    levels = [0.0, 0.5, 1.0] if args.quick else [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    until = 720.0 if args.quick else -1.0
    setting = Setting()
    lru = run_world("social_feed", agents, "lru", setting=setting, budget_fraction=0.25,
                    until=until)
    rows = []
    for noise in levels:
        r = run_world("social_feed", agents, "scalesim", setting=setting, budget_fraction=0.25,
                      until=until, noise=noise)
        rows.append(r)
        rows.append({**lru, "noise": noise})
        print(f"noise {noise:4.2f} scalesim {r['modeled_makespan_s']:8.2f} s  lru "
              f"{lru['modeled_makespan_s']:8.2f} s (modeled)", flush=True)
    write_results("noise", rows, "noise", title=f"social_feed, {agents} users: distance noise",
                  quick=args.quick)
    worse = [r["noise"] for r in rows if r["policy"] == "scalesim"
             and r["modeled_makespan_s"] >= lru["modeled_makespan_s"]]
    headline("noise", agents=agents, setting=setting.label(),
             scalesim_stops_beating_lru_at=min(worse) if worse else None,
             speedup_vs_lru={str(r["noise"]): round(lru["modeled_makespan_s"]
                                                    / r["modeled_makespan_s"], 3)
                             for r in rows if r["policy"] == "scalesim"})


if __name__ == "__main__":
    main()
