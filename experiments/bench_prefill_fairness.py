"""Short replies beside a long prompt: how long they wait, with and without a prefill cap.

A client sends one long prompt (``--long-tokens`` tokens of prompt) and, just after it,
``--short`` short requests (a one-line question, ``--short-tokens`` output tokens each), all to
one engine on the real model. Each iteration spends ``runtime.max_batch_tokens`` tokens:
without a cap the long prompt takes every iteration's whole budget, and the short requests wait
until it is done. ``runtime.shared_prefill`` caps the prompt tokens one sequence computes in an
iteration others need. For each cap in ``--caps`` (0: none) the run measures the wall latency of
every request (submitted to finished), alternating the settings ``--rounds`` times on one
loaded model, and prints the medians and each cap's ratio to no cap, measured side by side.

    python -m experiments.bench_prefill_fairness [--quick] [--caps 0,128,32]

Everything is measured on the machine it runs on (greedy decoding, end-of-sequence ignored, so
every setting computes the same tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from experiments.harness import headline
from runtime import Request, SamplingParams
from scalesim.assembly import assemble_engine
from scalesim.config import RuntimeConfig

FILLER = ("The committee met at dawn to read the harvest ledgers, the river reports and the "
          "letters from the northern villages, one by one, before anyone spoke. ")


def run_once(engine: Any, long_prompt: str, shorts: int, short_tokens: int,
             tag: str) -> dict[str, float]:
    """Submit the long request, then the short ones, step until all finish; wall latencies."""
    submitted: dict[int, float] = {}
    names: dict[int, str] = {}
    greedy = dict(temperature=0.0, ignore_eos=True)
    # The run's tag leads the long prompt: no run reuses another's cached KV.
    long_id = engine.submit(Request(f"{tag}-reader", f"[{tag}] {long_prompt}",
                                    sampling=SamplingParams(max_tokens=8, **greedy)))
    submitted[long_id], names[long_id] = time.perf_counter(), "long"
    engine.step()  # the long prompt is under way when the short ones arrive
    for i in range(shorts):
        request_id = engine.submit(Request(f"{tag}-asker{i}", f"Question {i}: what is {i} + {i}?",
                                           sampling=SamplingParams(max_tokens=short_tokens,
                                                                   **greedy)))
        submitted[request_id], names[request_id] = time.perf_counter(), f"short{i}"
    latency: dict[str, float] = {}
    while len(latency) < len(submitted):
        for done in engine.step().finished:
            if done.error:
                raise RuntimeError(f"request {done.request_id} failed: {done.error}")
            latency[names[done.request_id]] = time.perf_counter() - submitted[done.request_id]
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke test)")
    parser.add_argument("--caps", default="0,128,32",
                        help="prefill tokens beside decodes, comma-separated (0: no cap)")
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--short-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.long_tokens, args.short, args.short_tokens, args.rounds = 600, 2, 6, 1
    caps = [int(c) for c in args.caps.split(",")]
    # One model for every cap: the scheduler's cap is set between runs.
    engine = assemble_engine(RuntimeConfig(executor="torch", kv_cache_tokens=16384,
                                           memory={"policy": "lru"}))
    long_prompt = (FILLER * (args.long_tokens // 25 + 1))
    long_prompt = long_prompt[:len(long_prompt) * args.long_tokens
                              // max(1, engine.prompt_tokens("", long_prompt))]
    scheduler = engine.scheduler  # type: ignore[attr-defined]
    run_once(engine, long_prompt[:400], 1, 2, "warm-up")
    runs: dict[int, list[dict[str, float]]] = {cap: [] for cap in caps}
    for round_ in range(args.rounds):
        for cap in caps:
            scheduler.shared_prefill = cap
            runs[cap].append(run_once(engine, long_prompt, args.short, args.short_tokens,
                                      f"r{round_}c{cap}"))
    engine.close()
    base = caps[0]
    result: dict[str, Any] = {"experiment": "bench_prefill_fairness", "modeled": False,
                              "long_prompt_tokens": engine.prompt_tokens("", long_prompt),
                              "short_requests": args.short, "short_tokens": args.short_tokens,
                              "max_batch_tokens": scheduler.max_batch_tokens,
                              "rounds": args.rounds}
    print(f"long prompt {result['long_prompt_tokens']} tokens, {args.short} short requests of "
          f"{args.short_tokens} tokens, max_batch_tokens {scheduler.max_batch_tokens}")
    for cap in caps:
        short = statistics.median(v for run in runs[cap] for k, v in run.items() if k != "long")
        long = statistics.median(run["long"] for run in runs[cap])
        # ratios pair by pair: the same round's run without a cap over this one
        short_ratio = statistics.median(
            statistics.median(v for k, v in b.items() if k != "long")
            / statistics.median(v for k, v in a.items() if k != "long")
            for a, b in zip(runs[cap], runs[base]))
        long_ratio = statistics.median(b["long"] / a["long"] for a, b in zip(runs[cap], runs[base]))
        label = f"cap {cap}" if cap else "no cap"
        print(f"{label:>8}: short replies {short:6.2f} s (median), long prompt {long:6.2f} s; "
              f"short {short_ratio:.2f}x faster, long {long_ratio:.2f}x faster than cap {base}")
        result[f"short_s_{cap}"] = round(short, 3)
        result[f"long_s_{cap}"] = round(long, 3)
        result[f"short_speedup_{cap}"] = round(short_ratio, 3)
        result[f"long_speedup_{cap}"] = round(long_ratio, 3)
    headline(result, keep_as="bench_prefill_fairness", quick=args.quick)


if __name__ == "__main__":
    main()
