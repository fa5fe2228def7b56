"""Single-stream decode speed by thread setting, alone and beside a process that takes one core.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the PyPI wheels), and a decode step of
a small model is a few hundred short parallel regions. When another process takes a core, a worker
that waits at a region's barrier for a descheduled sibling either spins (burning the core the
sibling needs) or sleeps; the run's speed then depends on the wait policy and the thread count.
Each setting runs in its own process (the policy is read when libgomp loads), quiet and then with
a busy-loop process beside it, alternating, several passes; the medians are printed with the
slowdown each setting suffers from the neighbour:

    python -m experiments.bench_threads [--passes 3] [--tokens 64]

Ends with one JSON line (also ``results/bench_threads.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from experiments.harness import alternating, headline

#: (name, environment, threads); "default" is what runtime.threads chooses by itself (it sees
#: the busy neighbour, which starts first); the others force all cores or one
SETTINGS = [
    ("default", {}, 0),
    ("all-cores", {}, -1),
    ("all-cores-spin", {"OMP_WAIT_POLICY": "ACTIVE"}, -1),
    ("all-cores-passive", {"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    ("1-thread", {}, 1),
]

CHILD = """
import sys, time
from runtime import Request, SamplingParams, build_engine
from runtime.threads import available_cores
threads, tokens = int(sys.argv[1]), int(sys.argv[2])
threads = available_cores() if threads < 0 else threads
engine = build_engine("torch", dtype="bfloat16", quantization="int4", threads=threads or None)
def run(n):
    engine.submit(Request("a", "Tell me a story.", prefix="You are a storyteller.",
                          sampling=SamplingParams(max_tokens=n, ignore_eos=True)))
    done = None
    while engine.has_work():
        finished = engine.step().finished
        done = finished[-1] if finished else done
    return (done.output_tokens - 1) / (done.finish_wall - done.first_token_wall)
run(8)
print(run(tokens))
"""


def decode_rate(env: dict[str, str], threads: int, tokens: int, busy: bool) -> float:
    """Decode tokens/s of one child process, with a busy neighbour process if ``busy``."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tokens)],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=900, check=True).stdout
        return float(out.strip().splitlines()[-1])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="one pass of 8 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.tokens = 1, 8
    rates: dict[tuple[str, bool], list[float]] = {}
    for p, order in enumerate(alternating(args.passes, (False, True))):
        for name, env, threads in SETTINGS:
            for neighbour in order:
                rates.setdefault((name, neighbour), []).append(
                    decode_rate(env, threads, args.tokens, neighbour))
        print(f"pass {p + 1}: " + ", ".join(f"{n}{' busy' if b else ''} {v[-1]:.1f}"
                                             for (n, b), v in rates.items()), flush=True)
    line: dict = {"experiment": "bench_threads", "cores": len(os.sched_getaffinity(0)),
                  "passes": args.passes, "tokens": args.tokens}
    print(f"\n{'setting':>18} {'quiet tok/s':>12} {'busy tok/s':>11} {'busy/quiet':>11}")
    for name, _, _ in SETTINGS:
        quiet, busy = (statistics.median(rates[name, b]) for b in (False, True))
        print(f"{name:>18} {quiet:12.1f} {busy:11.1f} {busy / quiet:11.2f}")
        line[f"{name}_quiet_tok_s"] = round(quiet, 1)
        line[f"{name}_busy_tok_s"] = round(busy, 1)
    return headline(line, keep_as="bench_threads", quick=args.quick)


if __name__ == "__main__":
    main()
