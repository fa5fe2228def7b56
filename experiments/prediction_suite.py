"""How well invocation distance holds on every example world, and what it buys (modeled).

Every example world runs at the scale of its ``worlds/<name>_large.yaml`` on the modeled executor
in the paper's setting (Qwen2.5-7B on an H100, rank-64 adapters, 2,048-token personas, a 40 GB
agent-memory budget, evicted prefix KV dropped) under ``lru``, ``scalesim``, ``belady`` (the
offline optimum: the recorded call order of the ``lru`` run, whose sim-time order every policy
shares) and ``infinite`` (every object resident from the start: the bound). Per world it reports
the oracle's Kendall tau (overall and per source, with the baseline each source is judged
against), the makespans side by side, ``speedup_vs_lru``, ``slowdown_vs_belady`` (scalesim's
regret against the optimum), ``gap_closed`` (the fraction of the lru-to-belady makespan gap that
scalesim closes: 1 is the optimum, 0 no better than lru) and ``slowdown_vs_infinite``. CSV + PNG in ``experiments/results/``
and one JSON headline with ``min_speedup_vs_lru`` over the worlds, ``max_slowdown_vs_belady`` and
``mean_tau``. Every time here is modeled.

    python -m experiments.prediction_suite [--quick] [--worlds town,outbreak]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from experiments.modeled_sim import REPLIES, Setting, headline, run_modeled
from experiments.results_dir import results_dir

WORLDS_DIR = Path(__file__).resolve().parent.parent / "worlds"
WORLDS = ["town", "social_feed", "round_table", "traffic", "outbreak", "market", "supply_chain"]
POLICIES = ["lru", "scalesim", "belady", "infinite"]
BUDGET_BYTES = 40 * 10**9
SETTING = Setting(hardware="H100", model="qwen2.5-7b", lora_rank=64, prefix_tokens=2048)

#: ``--quick``: each world's agent count (and span) cut so the whole suite runs in a minute.
QUICK = {
    "town": {"villagers": 120},
    "social_feed": {"users": 600, "seed_posts": 4},
    "round_table": {"tables": 20},
    "traffic": {"vehicles": 150, "size": 8, "patience": 12},
    "outbreak": {"people": 300},
    "market": {"traders": 240},
    "supply_chain": {"warehouses": 4, "shops": 80},
}
QUICK_BUDGET_BYTES = 4 * 10**9


def large_config(world: str) -> tuple[str, dict[str, Any], float | None, Any]:
    """The world class, parameters, ``sim.until`` and modeled replies (the harness's unless it
    names its own) of ``worlds/<world>_large.yaml``."""
    doc = yaml.safe_load((WORLDS_DIR / f"{world}_large.yaml").read_text())
    until = (doc.get("sim") or {}).get("until")
    modeled = (doc.get("runtime") or {}).get("modeled") or {}
    replies = modeled.get("replies") or REPLIES  # a list, or answers per prompt pattern
    return doc["world"]["class"], dict(doc["world"].get("params") or {}), until, replies


def run_suite_world(world: str, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every policy on one world; returns the rows and the scalesim run's oracle quality."""
    cls, params, until, replies = large_config(world)
    budget = BUDGET_BYTES
    if quick:
        params.update(QUICK.get(world, {}))
        budget = QUICK_BUDGET_BYTES
    rows: list[dict[str, Any]] = []
    order: list[str] | None = None
    quality: dict[str, Any] = {}
    for policy in POLICIES:
        oracle: dict[str, Any] = {}
        r = run_modeled(cls, params, policy, setting=SETTING, memory_bytes=budget,
                        until=until, order=order, oracle=oracle, replies=replies)
        order = order or r["order"]
        if policy == "scalesim":
            quality = oracle
        r["world"] = world
        rows.append(r)
        print(f"{world:12s} {policy:9s} calls {r['calls']:7d} modeled makespan "
              f"{r['modeled_makespan_s']:9.2f} s stall {r['modeled_stall_s']:8.2f} s "
              f"hits {r['hits']:7d} misses {r['misses']:7d} wall {r['wall_s']:6.1f} s",
              flush=True)
    return rows, quality


def summarise(world: str, rows: list[dict[str, Any]], quality: dict[str, Any]) -> dict[str, Any]:
    """One world's row. Ratios come as makespans and per call, and ``calls_by_policy`` says
    whether they differ: since answers take their place in the event queue when a call is made,
    a seeded world makes the same calls under every policy and the two agree (before, agents of
    one instant resumed in the order memory let the engine finish their calls)."""
    makespan = {r["policy"]: r["modeled_makespan_s"] for r in rows}
    calls = {r["policy"]: r["calls"] for r in rows}
    per_call = {p: m / calls[p] for p, m in makespan.items() if calls[p]}
    misses = {r["policy"]: r["misses"] for r in rows}
    sources = quality.get("sources", {})
    return {
        "world": world, "calls": rows[0]["calls"], "kendall_tau": quality.get("kendall_tau"),
        **{f"tau_{s}": v["kendall_tau"] for s, v in sources.items()},
        **{f"baseline_tau_{s}": v["baseline_tau"] for s, v in sources.items()},
        "distrusted": ",".join(s for s, v in sources.items() if not v["trusted_at_end"]),
        "wakeups_then_call": quality.get("call_rates", {}).get("wakeups_then_call"),
        **{f"makespan_{p}": round(m, 3) for p, m in makespan.items()},
        "speedup_vs_lru": round(makespan["lru"] / makespan["scalesim"], 4),
        # How much of what an oracle could win over lru scalesim wins (1: all of it).
        "gap_closed": (round((makespan["lru"] - makespan["scalesim"])
                             / (makespan["lru"] - makespan["belady"]), 4)
                       if makespan["lru"] > makespan["belady"] else None),
        "calls_by_policy": calls,
        "speedup_vs_lru_per_call": round(per_call["lru"] / per_call["scalesim"], 4),
        "gap_closed_per_call": (round((per_call["lru"] - per_call["scalesim"])
                                      / (per_call["lru"] - per_call["belady"]), 4)
                                if per_call["lru"] > per_call["belady"] else None),
        "slowdown_vs_belady": round(makespan["scalesim"] / makespan["belady"], 4),
        "slowdown_vs_infinite": round(makespan["scalesim"] / makespan["infinite"], 4),
        "infinite_is_a_bound": all(m >= makespan["infinite"] for m in makespan.values()),
        "extra_misses_vs_belady": misses["scalesim"] - misses["belady"],
    }


def plot(summary: list[dict[str, Any]], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [s["world"] for s in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        ratios = [s[f"makespan_{policy}"] / s["makespan_lru"] for s in summary]
        left.bar([x + i * width for x in range(len(worlds))], ratios, width, label=policy)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(worlds))], worlds, fontsize=8)
    left.set_ylabel("modeled makespan / lru's")
    left.legend(fontsize=7)
    taus = [s["kendall_tau"] or 0.0 for s in summary]
    right.bar(worlds, taus)
    right.set_ylabel("oracle Kendall tau")
    right.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"prediction suite (modeled)\n{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small worlds (CI smoke test)")
    parser.add_argument("--worlds", default=",".join(WORLDS))
    args = parser.parse_args()
    import pandas as pd

    worlds = [w for w in args.worlds.split(",") if w]
    unknown = [w for w in worlds if not (WORLDS_DIR / f"{w}_large.yaml").is_file()]
    if unknown:
        parser.error(f"--worlds: no worlds/{unknown[0]}_large.yaml")
    rows, summary = [], []
    for world in worlds:
        part, quality = run_suite_world(world, args.quick)
        rows += part
        summary.append(summarise(world, part, quality))
        print(json.dumps(summary[-1]), flush=True)
    out = results_dir(args.quick)
    pd.DataFrame([{k: v for k, v in r.items() if k != "order"} for r in rows]).to_csv(
        out / "prediction_suite_runs.csv", index=False)
    pd.DataFrame(summary).to_csv(out / "prediction_suite.csv", index=False)
    plot(summary, out / "prediction_suite.png", SETTING.label())
    taus = [s["kendall_tau"] for s in summary if s["kendall_tau"] is not None]
    headline("prediction_suite", setting=SETTING.label(),
             budget_gb=(QUICK_BUDGET_BYTES if args.quick else BUDGET_BYTES) / 1e9,
             worlds=worlds,
             min_speedup_vs_lru=min(s["speedup_vs_lru"] for s in summary),
             max_slowdown_vs_belady=max(s["slowdown_vs_belady"] for s in summary),
             mean_tau=round(sum(taus) / len(taus), 4) if taus else None,
             gap_closed={s["world"]: s["gap_closed"] for s in summary},
             tau={s["world"]: s["kendall_tau"] for s in summary},
             speedup_vs_lru={s["world"]: s["speedup_vs_lru"] for s in summary},
             min_speedup_vs_lru_per_call=min(s["speedup_vs_lru_per_call"] for s in summary),
             gap_closed_per_call={s["world"]: s["gap_closed_per_call"] for s in summary},
             infinite_is_a_bound=all(s["infinite_is_a_bound"] for s in summary))


if __name__ == "__main__":
    main()
