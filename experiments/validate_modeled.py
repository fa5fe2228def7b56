"""Check the modeled engine against a real run: the same world, replayed, measured vs modeled.

A world runs on the torch engine (SmolLM2-135M on this CPU); every forward pass is timed. The
same world and seed then runs on the modeled engine with the ``cpu`` hardware profile and
:class:`runtime.executors.modeled.ReplayChat`: prompts are tokenized with the real chat
template and each call gets the reply, and the number of output tokens, that the real run
gave it, so the world makes the same calls in the same order. Printed: calls and tokens of both
(they must agree, or the replay diverged), measured compute seconds (the forward passes, as the
engine times them: :class:`runtime.interface.StepTimed`) and measured wall seconds, the modeled makespan, and modeled / measured, for each world of
``--worlds`` (town, social_feed and round_table by default); writes
``results/validate_modeled.csv`` / ``.png`` and a JSON line whose ``modeled_over_measured`` maps
each world to its modeled makespan / measured serving time (compute plus the stalls waiting for
memory objects).

One more row replays a **disk-tier run** (``--disk-world``, social_feed by default): a device
budget of a quarter of the prefix KV the agents used in a first pass, no host tier, personas evicted to a fresh
persistent store and read back from it with direct I/O; the modeled replay has the same memory
settings, so its misses cost the ``cpu`` profile's disk time (``disk_bw``, ``disk_latency``,
fitted by ``experiments.calibrate``). ``--disk-world none`` leaves it out.

    python -m experiments.validate_modeled [--quick] [--worlds a.yaml,b.yaml] [--set k=v ...]

The comparison is of serving time: the world's own Python time, which the real wall time also
contains, is not part of either the model or the measured compute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from experiments.harness import headline, measured_run
from experiments.results_dir import results_dir
from runtime.executors.modeled import ReplayChat
from runtime.model.chat import ChatFormat
from scalesim import simulate as run
from scalesim.config import ConfigError, load_config, parse_override
from scalesim.assembly import assemble_engine

WORLDS = ("worlds/town.yaml", "worlds/social_feed.yaml", "worlds/round_table.yaml")

#: the modeled replay: the ``cpu`` profile, prefix KV managed, no adapters (the real runs have
#: none); everything else of the ``runtime`` section is the real run's
MODELED = {"runtime.executor": "modeled", "runtime.modeled.hardware": "cpu",
           "runtime.modeled.lora_rank": 0, "runtime.modeled.managed": ["prefix_kv"]}


def totals(trace: Any) -> dict[str, int]:
    return {"calls": len(trace), "prompt_tokens": int(trace.prompt_tokens.sum()),
            "output_tokens": int(trace.output_tokens.sum())}


def chat_format(model: str) -> ChatFormat:
    """The chat template of ``model``, as the real engine encodes with it: the replay tokenizes
    every prompt the way the recording did (the tokenizer alone; the replay computes nothing)."""
    from transformers import AutoTokenizer

    from runtime.model.loader import resolve_model

    return ChatFormat(AutoTokenizer.from_pretrained(resolve_model(model), local_files_only=True))


def validate(world: str, overrides: dict[str, Any], work: Path,
             label: str | None = None) -> dict[str, Any]:
    """Run ``world`` on the torch engine, replay it on the modeled one; return both totals."""
    config = load_config(world, {"runtime.executor": "torch", **overrides})
    real = measured_run(config, work / f"{Path(world).stem}-real")
    recorded, compute, wall = real.result, real.steps, real.makespan_s

    replay = load_config(world, {**overrides, **MODELED})
    modeled = assemble_engine(replay.runtime, source=replay.source,
                              chat=ReplayChat(chat_format(config.runtime.model), recorded.trace))
    replayed = run(replay, out=work / f"{Path(world).stem}-modeled", engine=modeled)
    model = replayed.summary["modeled"]
    makespan, modeled_stall = model["modeled_makespan_s"], model["modeled_stall_s"]

    a, b = totals(recorded.trace), totals(replayed.trace)
    label = label or Path(world).stem
    print(f"{label}: real {a}, replayed {b}" + ("" if a == b else "  <- DIVERGED"))
    stall = recorded.summary["memory"]["stall_s"]
    serving = compute.seconds + stall
    ratio = makespan / serving
    print(f"  measured: compute {compute.seconds:.2f} s (forward passes, {compute.steps} steps), "
          f"stall {stall:.2f} s, wall {wall:.2f} s; modeled ({model['hardware']} profile, "
          f"{model['model_profile']}): makespan {makespan:.2f} s (stall {modeled_stall:.2f} s), "
          f"{model['steps']} steps; modeled / measured {ratio:.3f}", flush=True)
    return {"world": label, "replay_identical": a == b, **a,
            "measured_compute_s": round(compute.seconds, 3), "measured_stall_s": round(stall, 3),
            "modeled_stall_s": round(modeled_stall, 3), "measured_wall_s": round(wall, 3),
            "measured_steps": compute.steps, "modeled_steps": model["steps"],
            "modeled_makespan_s": round(makespan, 3),
            "modeled_over_measured": round(ratio, 3)}


def disk_tier(world: str, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Overrides for the disk-tier replay of ``world``: a device budget of a quarter of the
    prefix KV its agents' calls used in a first pass (the bytes of each persona's KV object, as
    its memory log records them), no host tier, a fresh persistent store."""
    config = load_config(world, {"runtime.executor": "torch", **overrides})
    memory = run(config, out=work / f"{Path(world).stem}-probe").memory
    personas = memory[memory.kind == "prefix_kv"].drop_duplicates("object")
    prefixes = int(personas.bytes.sum())
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
    headline({"experiment": "validate_modeled", "modeled": "cpu profile, smollm2-135m",
              "replay_identical": all(r["replay_identical"] for r in rows),
              "modeled_over_measured": {r["world"]: r["modeled_over_measured"] for r in rows}})


if __name__ == "__main__":
    main()
