"""Two quantization formats of the ScaleSim engine, side by side on bench_peers' workload.

One process builds an engine per format (``--formats int4,int4x8``: the weight-only format the
benchmark used before, and the activation-quantized one) and serves ``bench_peers``' agents with
each in alternating passes (fresh personas every pass, the order reversed every other pass), then
times single-stream decode of the same long prompt on each, alternating too. It prints each
format's medians and the ratio of the second to the first, pass by pass, so a machine shared
with other jobs weighs on both alike (compare ratios, not absolute rates, across runs). A format
ending in ``+kv8`` also keeps its KV pool as int8 rows (``runtime.kv_cache_dtype: int8``).

    python -m experiments.bench_formats [--formats int4,int4x8] [--agents 1,8,32] [--passes 3]
    python -m experiments.bench_formats --formats int4x8,int4x8+kv8
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from experiments.bench_peers import (Pass, agent_persona, scalesim_pass, scalesim_single,
                                     summarize, workload)
from experiments.harness import alternating, headline
from runtime import Engine, build_engine


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int4,int4x8",
                        help="two runtime.quantization values, each optionally with +kv8")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--agents", default="1,8,32")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the cores this process may use")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    formats = args.formats.split(",")
    assert len(formats) == 2, "--formats takes two formats"
    counts = [int(n) for n in args.agents.split(",")]
    engines: dict[str, Engine] = {
        f: build_engine("torch", dtype=args.dtype, quantization=f.removesuffix("+kv8"),
                        kv_cache_dtype="int8" if f.endswith("+kv8") else "auto",
                        max_num_seqs=max(counts), max_batch_tokens=512) for f in formats}
    for f, engine in engines.items():  # one-time costs (kernel build, allocations)
        scalesim_pass(engine, workload(2, 90_000, 1), 4, f"warm-{f}")
    print(f"{threads} threads, {args.dtype}; formats {formats[0]} vs {formats[1]}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    line: dict = {"experiment": "bench_formats", "formats": formats, "dtype": args.dtype,
                  "threads": threads, "passes": args.passes}
    next_agent = 0
    for n in counts:
        runs: dict[str, list[Pass]] = {f: [] for f in formats}
        for p, order in enumerate(alternating(args.passes, formats)):
            work = workload(n, next_agent, args.calls)  # the same personas for both formats
            next_agent += n
            for f in order:
                runs[f].append(scalesim_pass(engines[f], work, args.max_tokens, f"{f}-p{p}"))
        ratio = statistics.median(b.calls_per_s / a.calls_per_s
                                  for a, b in zip(runs[formats[0]], runs[formats[1]]))
        by = {f: summarize(r, args.max_tokens) for f, r in runs.items()}
        print(f"{n:>3} agents (load {os.getloadavg()[0]:.2f}): " + "  ".join(
            f"{f} {s['calls_per_s']:.3f} calls/s, TTFT p50 {s['ttft_p50_s']:.3f} s"
            for f, s in by.items()) + f"  -> {formats[1]}/{formats[0]} {ratio:.2f}x", flush=True)
        line[f"ratio_calls_per_s_{n}"] = round(ratio, 3)
        for f, s in by.items():
            line[f"{f}_calls_per_s_{n}"] = round(s["calls_per_s"], 3)
    prefix = " ".join(agent_persona(80_000 + i) for i in range(2))
    prompt = "Tell the story of the town's spring fair in detail."
    single: dict[str, list[float]] = {f: [] for f in formats}
    for p, order in enumerate(alternating(args.passes, formats)):
        for f in order:
            single[f].append(scalesim_single(engines[f], f"(Take {p}.) {prefix}", prompt,
                                             4 * args.max_tokens)[1])
    ratio = statistics.median(b / a for a, b in zip(single[formats[0]], single[formats[1]]))
    print(f"single-stream decode (load {os.getloadavg()[0]:.2f}): " + "  ".join(
        f"{f} {statistics.median(v):.1f} tok/s" for f, v in single.items()) +
        f"  -> {formats[1]}/{formats[0]} {ratio:.2f}x", flush=True)
    line["ratio_decode"] = round(ratio, 3)
    for f, v in single.items():
        line[f"{f}_decode_tok_s"] = round(statistics.median(v), 1)
    for engine in engines.values():
        engine.close()
    return headline(line, keep_as="bench_formats")


if __name__ == "__main__":
    main()
