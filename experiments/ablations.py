"""Which part of ScaleSim's policy matters: each ablation's modeled makespan next to the full one.

============================ ====================================================================
scalesim                     distance eviction + distance prefetch + urgent loads preempt prefetch
scalesim-no-prefetch         distance eviction, load on demand
lru-prefetch                 no priority eviction: LRU order, distance prefetch
scalesim-no-preempt          an urgent load waits behind a running prefetch
scalesim-adapters            adapters only: no prefix KV objects (every call prefills its prefix)
scalesim-prefix              prefix KV only: agents have no adapters
lru                          the baseline
============================ ====================================================================

The last two change what is managed, so compare them with ``lru`` run on the same objects (the
``*-lru`` rows). Writes ``results/ablations.csv`` / ``.png`` and a JSON line (modeled).

    python -m experiments.ablations [--quick]
"""

from __future__ import annotations

from experiments.modeled_sim import Setting, experiment_parser, headline, run_world, write_results

VARIANTS = ["scalesim", "scalesim-no-prefetch", "lru-prefetch", "scalesim-no-preempt", "lru"]


def main() -> None:
    parser = experiment_parser(__doc__, agents=1000)
    args = parser.parse_args()
    agents = 200 if args.quick else args.agents
    until = 720.0 if args.quick else -1.0
    base, rows = Setting(), []
    for variant in VARIANTS:
        rows.append(run_world("social_feed", agents, variant, setting=base,
                              budget_fraction=0.25, until=until))
    for only, kind in (("scalesim-adapters", "adapter"), ("scalesim-prefix", "prefix_kv")):
        rows.append(run_world("social_feed", agents, only, setting=base, budget_fraction=0.25,
                              until=until))
        lru = run_world("social_feed", agents, "lru", budget_fraction=0.25, until=until,
                        setting=Setting(managed=(kind,)))
        lru["policy"] = f"{only}-lru"
        rows.append(lru)
    for i, r in enumerate(rows):
        r["variant"] = i
        print(f"{r['policy']:24s} modeled makespan {r['modeled_makespan_s']:8.2f} s  stall "
              f"{r['modeled_stall_s']:7.2f} s", flush=True)
    write_results("ablations", rows, "variant", series="policy",
                  title=f"social_feed, {agents} users, budget 1/4 of working set: ablations",
                  quick=args.quick)
    headline("ablations", agents=agents, setting=base.label(),
             makespan_s={r["policy"]: round(r["modeled_makespan_s"], 3) for r in rows})


if __name__ == "__main__":
    main()
