"""Check the modeled engine against a real run: the same world, replayed, measured vs modeled.

A world runs on the torch engine (SmolLM2-135M on this CPU); every forward pass is timed. The
same world and seed then runs on the modeled engine with the ``cpu`` hardware profile and
:class:`runtime.executors.modeled.ReplayChat`: prompts are tokenized with the real chat
template and each call gets the reply, and the number of output tokens, that the real run
gave it, so the world makes the same calls in the same order. Printed: calls and tokens of both
(they must agree, or the replay diverged), measured compute seconds (inside ``execute``) and
measured wall seconds, the modeled makespan, and modeled / measured, for each world of
``--worlds`` (town, social_feed and round_table by default); writes
``results/validate_modeled.csv`` / ``.png`` and a JSON line whose ``modeled_over_measured`` maps
each world to its modeled makespan / measured serving time (compute plus the stalls waiting for
memory objects).

One more row replays a **disk-tier run** (``--disk-world``, social_feed by default): a device
budget of a quarter of the agents' prefix KV, no host tier, personas evicted to a fresh
persistent store and read back from it with direct I/O; the modeled replay has the same memory
settings, so its misses cost the ``cpu`` profile's disk time (``disk_bw``, ``disk_latency``,
fitted by ``experiments.calibrate``). ``--disk-world none`` leaves it out.

    python -m experiments.validate_modeled [--quick] [--worlds a.yaml,b.yaml] [--set k=v ...]

The comparison is of serving time: the world's own Python time, which the real wall time also
contains, is not part of either the model or the measured compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime import build_engine
from experiments.results_dir import results_dir
from experiments.step_timer import time_steps
from runtime.executors.modeled import ReplayChat
from scalesim.config import ConfigError, load_config, parse_override
from scalesim import simulate as run
from scalesim.simulation import build_engine_for, memory_options

WORLDS = ("worlds/town.yaml", "worlds/social_feed.yaml", "worlds/round_table.yaml")


def totals(trace: Any) -> dict[str, int]:
    return {"calls": len(trace), "prompt_tokens": int(trace.prompt_tokens.sum()),
            "output_tokens": int(trace.output_tokens.sum())}


def validate(world: str, overrides: dict[str, Any], work: Path,
             label: str | None = None) -> dict[str, Any]:
    """Run ``world`` on the torch engine, replay it on the modeled one; return both totals."""
    config = load_config(world, {"runtime.executor": "torch", **overrides})
    real = build_engine_for(config)
    compute = time_steps(real.executor)
    start = time.perf_counter()
    recorded = run(config, out=work / f"{Path(world).stem}-real", engine=real)
    wall = time.perf_counter() - start

    ex = real.executor
    modeled = build_engine("modeled", model=config.runtime.model, hardware_profile="cpu",
                           lora_rank=0, managed=("prefix_kv",), **memory_options(config),
                           chat=ReplayChat(ex.chat, recorded.trace),
                           max_num_seqs=ex.max_num_seqs, max_batch_tokens=ex.max_batch_tokens)
    replayed = run(config, out=work / f"{Path(world).stem}-modeled", engine=modeled)
    model = modeled.executor

    a, b = totals(recorded.trace), totals(replayed.trace)
    label = label or Path(world).stem
    print(f"{label}: real {a}, replayed {b}" + ("" if a == b else "  <- DIVERGED"))
    stall = recorded.summary["memory"]["stall_s"]
    serving = compute.seconds + stall
    ratio = model.now / serving
    print(f"  measured: compute {compute.seconds:.2f} s (inside execute, {compute.steps} steps), "
          f"stall {stall:.2f} s, wall {wall:.2f} s; modeled ({model.hardware_name} profile, "
          f"{model.model_name}): makespan {model.now:.2f} s (stall {model.clock.stall:.2f} s), "
          f"{model.steps} steps; modeled / measured {ratio:.3f}", flush=True)
    return {"world": label, "replay_identical": a == b, **a,
            "measured_compute_s": round(compute.seconds, 3), "measured_stall_s": round(stall, 3),
            "modeled_stall_s": round(model.clock.stall, 3), "measured_wall_s": round(wall, 3),
            "measured_steps": compute.steps, "modeled_steps": model.steps,
            "modeled_makespan_s": round(model.now, 3),
            "modeled_over_measured": round(ratio, 3)}


def disk_tier(world: str, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Overrides for the disk-tier replay of ``world``: a device budget of a quarter of its
    agents' prefix KV (measured by a first pass), no host tier, a fresh persistent store."""
    config = load_config(world, {"runtime.executor": "torch", **overrides})
    probe = build_engine_for(config)
    run(config, out=work / f"{Path(world).stem}-probe", engine=probe)
    prefixes = sum(o.nbytes for o in probe.memory.objects.values() if o.kind == "prefix_kv")
    return {"runtime.memory.device_bytes": max(1, prefixes // 4), "runtime.memory.host_bytes": 0,
            "runtime.memory.kv_store": str(work / "disk-store"), "runtime.memory.policy": "lru"}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_compute_s"] for r in rows], 0.4,
           label="measured (torch executor, this CPU)")
    ax.bar([i + 0.2 for i in x], [r["modeled_makespan_s"] for r in rows], 0.4,
           label="modeled (cpu profile, replayed calls)")
    ax.set_xticks(list(x), [r["world"] for r in rows])
    ax.set_ylabel("serving seconds")
    ax.set_title("modeled vs measured, SmolLM2-135M", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the town's morning only")
    parser.add_argument("--worlds", default=",".join(WORLDS),
                        help="comma-separated world YAML files")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for python -m scalesim.run")
    parser.add_argument("--disk-world", default="worlds/social_feed.yaml",
                        help="world of the disk-tier replay ('none': no such row)")
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.set)
    worlds = args.worlds.split(",")
    if args.quick:
        worlds, overrides["sim.until"] = worlds[:1], 600
    work = Path(tempfile.mkdtemp(prefix="validate-modeled-"))
    try:
        rows = [validate(world, overrides, work) for world in worlds]
        if args.disk_world != "none":
            rows.append(validate(args.disk_world, {**overrides, **disk_tier(args.disk_world, overrides, work)},
                                 work, label=f"{Path(args.disk_world).stem}+disk"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

    import pandas as pd

    results = results_dir(args.quick)
    pd.DataFrame(rows).to_csv(results / "validate_modeled.csv", index=False)
    plot(rows, results / "validate_modeled.png")
    print(json.dumps({"experiment": "validate_modeled", "modeled": "cpu profile, smollm2-135m",
                      "replay_identical": all(r["replay_identical"] for r in rows),
                      "modeled_over_measured": {r["world"]: r["modeled_over_measured"]
                                                for r in rows}}))


if __name__ == "__main__":
    main()
