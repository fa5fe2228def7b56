"""What calls that take simulated time buy: batches, makespan and memory policies, per world.

An LLM call of duration 0 returns at the instant it was made, so the engine batches only the
calls of one instant; a world on a continuous clock (traffic, outbreak, town) then feeds it one
to five sequences per step. With a duration ``d`` the agent is busy thinking for ``d`` and the
engine runs only before a due time would pass, serving the calls of many instants together
(:mod:`scalesim.environment`). Question: how much does that buy per world, and what does it do
to the memory policies, now that many more agents are live at once?

Every example world runs at the scale of ``worlds/<name>_large.yaml`` on the modeled executor in
the paper's setting (the prediction suite's: Qwen2.5-7B on an H100, rank-64 adapters, 2,048-token
personas, a 40 GB agent-memory budget, evicted prefix KV dropped), at duration 0 and at the
durations, in the world's own time unit, at which about 16, 64, 256 and 1,024 calls would be in
flight on average (``d = calls / λ`` with ``λ`` the world's call rate at duration 0; a duration
changes the world's pace, so the measured mean is reported too). Each under ``lru``,
``scalesim``, ``belady`` (the recorded call order of the ``lru`` run at the same duration) and
``infinite``. Per run: modeled makespan, sequences and tokens per engine step, calls in flight,
hit rate and stall. ``results/sweep_duration.csv`` + ``.png`` and one JSON headline:
``max_speedup_over_duration_0`` (per world, the best duration's makespan against duration 0's,
under ``scalesim``, also per call), ``at_64_calls_in_flight`` (the same at the shortest
duration with at least 64 calls in flight on average), ``max_occupancy`` (sequences per step),
``min_scalesim_vs_lru`` (over worlds and durations) and ``scalesim_vs_lru`` per world and
duration, each also per call (equal while a world makes the same calls under every policy). Every
time is modeled.

    python -m experiments.sweep_duration [--quick] [--worlds traffic,town]
    python -m experiments.sweep_duration --combine   # one table from per-world runs

``--real`` runs the small worlds (``worlds/<name>.yaml``) on the real engine of their
``runtime`` section instead, at durations 0 and 1 (``--durations``): calls per wall second and
sequences per step. Those are wall-clock measurements: run them on a quiet machine.

    python -m experiments.sweep_duration --real [--worlds town,social_feed,round_table]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

from experiments.modeled_sim import headline, run_modeled
from experiments.prediction_suite import (BUDGET_BYTES, SETTING, WORLDS, WORLDS_DIR,
                                          large_config)
from experiments.results_dir import results_dir

POLICIES = ["lru", "scalesim", "belady", "infinite"]
#: calls in flight on average that the durations are chosen for (at duration 0's call rate)
IN_FLIGHT = (16, 64, 256, 1024)

#: ``--quick``: small worlds, two targets, a smaller budget: a smoke test of every path.
QUICK = {
    "town": {"villagers": 40},
    "social_feed": {"users": 200, "seed_posts": 2},
    "round_table": {"tables": 6},
    "traffic": {"vehicles": 60, "size": 6, "patience": 8, "trips": 1},
    "outbreak": {"people": 60},
    "market": {"traders": 60},
}
#: ``--quick``: a shorter span where the world's own is long.
QUICK_UNTIL = {"town": 720.0, "social_feed": 480.0, "outbreak": 2880.0, "market": 480.0}
QUICK_IN_FLIGHT = (16,)
QUICK_BUDGET_BYTES = 4 * 10**9

#: ``--real``: the small worlds whose ``worlds/<name>.yaml`` runs on the real model.
REAL_WORLDS = ["town", "social_feed", "round_table"]
#: ``--real --quick``: tiny versions of them (a smoke test of the path, not a measurement).
REAL_QUICK = {
    "town": ({"villagers": 2, "max_tokens": 4}, 700),
    "social_feed": ({"users": 4, "attach": 1, "max_tokens": 4}, 600),
    "round_table": ({"tables": 1, "players": 3, "rounds": 1, "max_tokens": 4}, None),
}


def round_duration(d: float) -> float:
    """``d`` to two significant digits (a duration a world author would write)."""
    if d <= 0:
        return 0.0
    digits = 1 - int(math.floor(math.log10(d)))
    return round(d, digits)


def run_policies(world: str, cls: str, params: dict[str, Any], until: float | None,
                 replies: tuple[str, ...], budget: int, duration: float) -> list[dict[str, Any]]:
    """Every policy on ``world`` at ``duration``; ``belady`` replays the ``lru`` run's order."""
    rows: list[dict[str, Any]] = []
    order: list[str] | None = None
    for policy in POLICIES:
        r = run_modeled(cls, params, policy, setting=SETTING, memory_bytes=budget, until=until,
                        order=order, replies=replies, call_duration=duration)
        order = order or r.pop("order")
        r.pop("order", None)
        occupancy = r.pop("occupancy")
        accesses = r["hits"] + r["misses"]
        r.update({"world": world, "duration": duration, "calls_per_time": r["calls"] /
                  r["sim_time"] if r["sim_time"] else 0.0,
                  "mean_calls_in_flight": occupancy["mean_calls_in_flight"],
                  "sequences_per_step": occupancy["sequences_per_step"],
                  "tokens_per_step": occupancy["tokens_per_step"],
                  "engine_iterations": occupancy["iterations"],
                  "hit_rate": round(r["hits"] / accesses, 4) if accesses else None})
        rows.append(r)
        print(f"{world:12s} d={duration:<8g} {policy:9s} calls {r['calls']:6d} in flight "
              f"{r['mean_calls_in_flight']:8.1f} seqs/step {r['sequences_per_step']:7.2f} "
              f"modeled makespan {r['modeled_makespan_s']:9.2f} s stall "
              f"{r['modeled_stall_s']:8.2f} s hit rate {r['hit_rate']} wall {r['wall_s']:6.1f} s",
              flush=True)
    return rows


def sweep_world(world: str, quick: bool, in_flight: tuple[int, ...] = IN_FLIGHT,
                keep: Path | None = None) -> list[dict[str, Any]]:
    """Duration 0, then the durations for ``in_flight`` calls in flight; with ``keep``, the
    rows so far are written there after every duration (a long sweep stopped keeps them)."""
    import pandas as pd

    cls, params, until, replies = large_config(world)
    budget = BUDGET_BYTES
    if quick:
        params.update(QUICK.get(world, {}))
        until = QUICK_UNTIL.get(world, until)
        budget = QUICK_BUDGET_BYTES
    rows = run_policies(world, cls, params, until, replies, budget, 0.0)
    if keep is not None:
        pd.DataFrame(rows).to_csv(keep, index=False)
    rate = rows[0]["calls_per_time"]
    durations = sorted({round_duration(n / rate) for n in (QUICK_IN_FLIGHT if quick
                                                              else in_flight)})
    for duration in durations:
        rows += run_policies(world, cls, params, until, replies, budget, duration)
        if keep is not None:
            pd.DataFrame(rows).to_csv(keep, index=False)
    return rows


def seconds_per_call(run: dict[str, Any]) -> float:
    """A run's modeled makespan per call it made."""
    return run["modeled_makespan_s"] / run["calls"]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline over the rows of every world (speedups and occupancy under ``scalesim``).

    A duration changes a world's pace, so a world with an end (``sim.until``) may make fewer
    calls within it: each speedup is given as makespans and per call.
    """
    by = {(r["world"], r["duration"], r["policy"]): r for r in rows}
    worlds = list(dict.fromkeys(r["world"] for r in rows))
    speedup: dict[str, Any] = {}
    at_64: dict[str, Any] = {}
    occupancy: dict[str, float] = {}
    ratio: dict[str, dict[str, float]] = {}
    # Per call as well as per makespan: the two agree while a world makes the same calls under
    # every policy, which the event queue now guarantees; a difference would show a regression.
    per_call: dict[str, dict[str, float]] = {}
    rises: dict[str, bool] = {}
    for world in worlds:
        durations = sorted({r["duration"] for r in rows if r["world"] == world})
        runs = [by[(world, d, "scalesim")] for d in durations]
        base = runs[0]

        def gain(run: dict[str, Any]) -> dict[str, Any]:
            return {"duration": run["duration"],
                    "speedup": round(base["modeled_makespan_s"] / run["modeled_makespan_s"], 3),
                    "speedup_per_call": round(seconds_per_call(base) / seconds_per_call(run),
                                              3),
                    "calls": run["calls"], "mean_calls_in_flight": run["mean_calls_in_flight"],
                    "sequences_per_step": run["sequences_per_step"]}

        speedup[world] = gain(max(runs, key=lambda r: base["modeled_makespan_s"]
                                  / r["modeled_makespan_s"]))
        busy = [r for r in runs if r["mean_calls_in_flight"] >= 64]
        at_64[world] = gain(busy[0]) if busy else None
        occupancy[world] = max(r["sequences_per_step"] for r in runs)
        ratio[world] = {f"{d:g}": round(by[(world, d, "lru")]["modeled_makespan_s"] /
                                        by[(world, d, "scalesim")]["modeled_makespan_s"], 4)
                        for d in durations}
        per_call[world] = {f"{d:g}": round(seconds_per_call(by[(world, d, "lru")])
                                           / seconds_per_call(by[(world, d, "scalesim")]), 4)
                           for d in durations}
        steps = [r["sequences_per_step"] for r in runs]
        rises[world] = all(a < b for a, b in zip(steps, steps[1:]))
    return {"max_speedup_over_duration_0": speedup, "at_64_calls_in_flight": at_64,
            "max_occupancy": occupancy,
            "min_scalesim_vs_lru": min(v for r in ratio.values() for v in r.values()),
            "scalesim_vs_lru": ratio,
            "min_scalesim_vs_lru_per_call": min(v for r in per_call.values() for v in r.values()),
            "scalesim_vs_lru_per_call": per_call, "occupancy_rises_with_duration": rises}


def plot(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(dict.fromkeys(r["world"] for r in rows))
    fig, axes = plt.subplots(2, len(worlds), figsize=(3.2 * len(worlds), 6), squeeze=False)
    for col, world in enumerate(worlds):
        top, bottom = axes[0][col], axes[1][col]
        mine = [r for r in rows if r["world"] == world]
        durations = sorted({r["duration"] for r in mine})
        xs = range(len(durations))
        for policy in POLICIES:
            top.plot(xs, [next(r["modeled_makespan_s"] for r in mine if r["duration"] == d
                               and r["policy"] == policy) for d in durations],
                     "o-", ms=3, label=policy)
        bottom.plot(xs, [next(r["sequences_per_step"] for r in mine if r["duration"] == d
                              and r["policy"] == "scalesim") for d in durations], "o-", ms=3)
        for ax in (top, bottom):
            ax.set_xticks(list(xs), [f"{d:g}" for d in durations], fontsize=7)
        top.set_yscale("log")
        top.set_title(world, fontsize=9)
        bottom.set_xlabel("call duration (world time unit)", fontsize=8)
        if col == 0:
            top.set_ylabel("makespan, s (modeled)", fontsize=8)
            bottom.set_ylabel("sequences per step (modeled)", fontsize=8)
            top.legend(fontsize=7)
    fig.suptitle(f"calls that take simulated time (modeled)\n{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_real(worlds: list[str], durations: list[float], quick: bool,
             params: dict[str, Any] | None = None) -> None:
    """The small worlds on the real engine of their ``runtime`` section: calls per wall second
    at each duration (a measurement: run it on a quiet machine). ``params`` override the
    worlds' parameters (more agents, more calls in flight); such a run is kept under its own
    name, ``sweep_duration_real_<key><value>...``."""
    import tempfile

    import pandas as pd

    from experiments.harness import headline as keep_headline, measured_run

    rows = []
    for world in worlds:
        doc = yaml.safe_load((WORLDS_DIR / f"{world}.yaml").read_text())
        if quick:
            tiny, doc["sim"]["until"] = REAL_QUICK[world]
            doc["world"]["params"].update(tiny)
        doc["world"]["params"].update(params or {})
        for duration in durations:
            doc["sim"]["call_duration"] = duration
            with tempfile.TemporaryDirectory() as out:
                run = measured_run(doc, Path(out))
            summary = run.result.summary
            rows.append({"world": world, "duration": duration, "calls": summary["calls"],
                         "makespan_s": round(run.makespan_s, 3),
                         "calls_per_s": round(summary["calls"] / run.makespan_s, 4),
                         "sequences_per_step": round(run.steps.mean_batch, 3),
                         "mean_calls_in_flight":
                             summary["occupancy"]["mean_calls_in_flight"],
                         "executor": doc["runtime"]["executor"]})
            print(json.dumps(rows[-1]), flush=True)
    name = "sweep_duration_real" + "".join(f"_{k}{v}" for k, v in (params or {}).items())
    pd.DataFrame(rows).to_csv(results_dir(quick) / f"{name}.csv", index=False)
    by = {(r["world"], r["duration"]): r["calls_per_s"] for r in rows}
    keep_headline({"experiment": "sweep_duration_real", "modeled": False, "params": params or {},
                   "calls_per_s_gain": {w: round(by[(w, durations[-1])] / by[(w, durations[0])],
                                                 3) for w in worlds}},
                  keep_as=name, quick=quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small worlds (a smoke test)")
    parser.add_argument("--worlds", default=None, help="comma-separated (default: all)")
    parser.add_argument("--real", action="store_true",
                        help="the small worlds on the real engine (wall time)")
    parser.add_argument("--in-flight", default=",".join(map(str, IN_FLIGHT)),
                        help="the calls in flight the durations are chosen for")
    parser.add_argument("--durations", default="0,1", help="--real: the durations to run")
    parser.add_argument("--params", default="",
                        help="--real: world parameters to override, e.g. villagers=48")
    parser.add_argument("--combine", action="store_true",
                        help="write the table, plot and headline of every world's "
                             "sweep_duration_<world>.csv (runs of --worlds)")
    args = parser.parse_args()
    import pandas as pd

    known = REAL_WORLDS if args.real else WORLDS
    worlds = args.worlds.split(",") if args.worlds else known
    unknown = [w for w in worlds if w not in known]
    if unknown:
        parser.error(f"--worlds: unknown world {unknown[0]!r}; choose from {', '.join(known)}")
    if args.real:
        params = {}
        for item in filter(None, args.params.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"--params: {item!r} is not key=value")
            params[key.strip()] = yaml.safe_load(value)
        run_real(worlds, [float(d) for d in args.durations.split(",")], args.quick, params)
        return
    out = results_dir(args.quick)
    rows: list[dict[str, Any]] = []
    if args.combine:
        parts = [out / f"sweep_duration_{w}.csv" for w in worlds]
        worlds = [w for w, p in zip(worlds, parts) if p.is_file()]
        rows = pd.concat([pd.read_csv(p) for p in parts if p.is_file()]).to_dict("records")
        name = "sweep_duration"
    else:
        for world in worlds:  # each also kept on its own, for --combine
            rows += sweep_world(world, args.quick,
                                tuple(int(n) for n in args.in_flight.split(",")),
                                keep=out / f"sweep_duration_{world}.csv")
        name = "sweep_duration" if args.worlds is None else f"sweep_duration_{'_'.join(worlds)}"
    pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
    plot(rows, out / f"{name}.png", SETTING.label())
    headline("sweep_duration", setting=SETTING.label(),
             budget_gb=(QUICK_BUDGET_BYTES if args.quick else BUDGET_BYTES) / 1e9,
             worlds=worlds, **summarise(rows))


if __name__ == "__main__":
    main()
