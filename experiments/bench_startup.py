"""Time to the first LLM call of a warm ``python -m scalesim.run``: what `make run` waits for.

Each pass starts a fresh process that runs a world exactly as the command does, but wraps
``Engine.step`` to note the wall time at which the first iteration (the first call's prefill)
starts and ends, and exits there; the times are counted from just before the process was spawned,
so the interpreter's start-up and every import count. The model must be converted and the
kernels built already (one earlier run does both): this measures a warm start.

    python -m experiments.bench_startup [--passes 5] [--world worlds/town.yaml]

Prints each pass, the medians, whether transformers was imported on the way (it must not be),
and the machine's load average (other jobs slow a start), then one JSON line (also
``results/bench_startup.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.harness import headline

CHILD = """
import os, sys, time
from runtime.engine import Engine

step = Engine.step
def first_step(self):
    start = time.time()
    step(self)
    print("FIRST_STEP", start, time.time(), "transformers" in sys.modules, flush=True)
    os._exit(0)  # the rest of the run is not start-up
Engine.step = first_step
from scalesim.run import main
sys.exit(main(sys.argv[1:]))
"""


def first_call(world: str, out: str) -> tuple[float, float, bool]:
    """Seconds from spawning a run of ``world`` to its first iteration's start and end, and
    whether transformers had been imported by then."""
    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, world, "--no-progress", "--out", out],
                          capture_output=True, text=True, timeout=900)
    marks = [line.split() for line in done.stdout.splitlines() if line.startswith("FIRST_STEP")]
    if not marks:
        raise RuntimeError(f"the run made no LLM call:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    _, start, end, transformers = marks[0]
    return float(start) - spawned, float(end) - spawned, transformers == "True"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--world", default="worlds/town.yaml")
    parser.add_argument("--quick", action="store_true", help="two passes")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes = 2
    load_before = os.getloadavg()[0]
    starts, ends, imported = [], [], False
    with tempfile.TemporaryDirectory() as work:
        for p in range(args.passes):
            start, end, transformers = first_call(args.world, os.path.join(work, f"run-{p}"))
            starts.append(start)
            ends.append(end)
            imported |= transformers
            print(f"pass {p + 1}: first call starts {start:.2f} s, ends {end:.2f} s after spawn"
                  f"{' (transformers imported)' if transformers else ''}", flush=True)
    load = round(max(load_before, os.getloadavg()[0]), 2)
    print(f"median: starts {statistics.median(starts):.2f} s, ends {statistics.median(ends):.2f} s "
          f"(load average up to {load} on {os.cpu_count()} cores)")
    return headline({"experiment": "bench_startup", "world": args.world, "passes": args.passes,
                     "first_call_start_s": round(statistics.median(starts), 2),
                     "first_call_end_s": round(statistics.median(ends), 2),
                     "max_first_call_start_s": round(max(starts), 2),
                     "transformers_imported": imported, "load_average": load},
                    keep_as="bench_startup", quick=args.quick)


if __name__ == "__main__":
    main()
