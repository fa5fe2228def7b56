"""One decode step of the real model, format against format, side by side in one process.

Loads the built-in SmolLM2-135M as the engine does (float32 checkpoint, quantized here) in each
format asked for, fills a paged KV pool with random keys and values (a step's cost does not
depend on their values) so that every sequence has ``--context`` tokens behind it, and times
``LlamaModel.forward`` of one decode token per sequence for each batch size. Formats are timed in
alternating rounds; the medians and each format's speed-up over the first one (measured in the
same rounds) are printed. ``--profile`` adds torch's operator profile of one format's step.
A format ending in ``+kv8`` keeps its KV pool as int8 rows (``runtime.kv_cache_dtype: int8``).

    python -m experiments.bench_decode_step [--formats int4,int4x8,bf16,int4x8+kv8] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from runtime.kv_cache import KVCache, quantize_rows
from runtime.model.attention import BatchLayout, select_attention
from runtime.model.llama import LlamaModel
from runtime.model.loader import load_checkpoint

#: format name -> (quantization, dtype)
FORMATS = {"float32": ("none", torch.float32), "bf16": ("none", torch.bfloat16),
           "int8": ("int8", torch.bfloat16), "int4": ("int4", torch.bfloat16),
           "int8x8": ("int8x8", torch.bfloat16), "int4x8": ("int4x8", torch.bfloat16),
           "int4x8-f32": ("int4x8", torch.float32)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int4,int4x8", help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=560, help="tokens behind each sequence")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: the cores this process may use")
    parser.add_argument("--dense-from", type=int, default=16)
    parser.add_argument("--profile", default="", help="a format whose batch-1 step to profile")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    names = args.formats.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    checkpoint = load_checkpoint("smollm2-135m", dtype="float32")
    c = checkpoint.config
    weights = {n: n.removesuffix("+kv8") for n in names}
    unknown = sorted(set(weights.values()) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)} (of {', '.join(FORMATS)}, each "
                     "optionally with +kv8)")
    models = {n: LlamaModel.from_tensors(checkpoint.tensors, c, quantization=FORMATS[n][0],
                                         dtype=FORMATS[n][1], dense_from=args.dense_from)
              for n in set(weights.values())}
    block = 16
    per_seq = -(-(args.context + args.steps * (args.rounds + 2)) // block)
    seqs = max(batches)

    def pool_of(name: str) -> tuple[torch.dtype, bool]:
        return FORMATS[weights[name]][1], name.endswith("+kv8")

    caches = {}
    for dtype, quantized in {pool_of(n) for n in names}:
        cache = KVCache(c.num_layers, per_seq * seqs, block, c.num_kv_heads, c.head_dim,
                        dtype=dtype, quantized=quantized)
        gen = torch.Generator().manual_seed(0)
        for pool in (cache.k, cache.v):
            values = torch.randn(*pool.shape[:-1], c.head_dim, generator=gen)
            pool.copy_(quantize_rows(values) if quantized else values.to(dtype))
        caches[dtype, quantized] = cache
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(seqs)]
    print(f"{threads} threads; context {args.context}; load average {os.getloadavg()[0]:.2f}; "
          f"median ms per decode step over {args.rounds} alternating rounds of {args.steps} steps",
          flush=True)

    def run(name: str, batch: int, position: int) -> None:
        model = models[weights[name]]
        cache = caches[pool_of(name)]
        attention = select_attention(cache, c.num_heads, c.num_kv_heads, c.head_dim, "auto")
        attention.plan(BatchLayout([1] * batch, [position] * batch, tables[:batch]))
        slots = torch.tensor([t[position // block] * block + position % block
                              for t in tables[:batch]])
        model.forward(torch.full((batch,), 42), torch.full((batch,), position), slots, cache,
                      attention, None, torch.arange(batch))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for i in range(3):
            run(args.profile, batches[0], args.context + i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                run(args.profile, batches[0], args.context + i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    for batch in batches:
        times: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(args.rounds + 1):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                for i in range(args.steps):
                    run(name, batch, args.context + i)
                if round_ > 0:  # the first round warms up
                    times[name].append((time.perf_counter() - start) / args.steps)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        first = names[0]
        # Per round, the first format's time over each format's: the speed-up, paired.
        ratios = {n: statistics.median(a / b for a, b in zip(times[first], times[n]))
                  for n in names}
        cells = "  ".join(f"{n} {med[n]:6.2f} ms ({ratios[n]:.2f}x)" for n in names)
        print(f"batch {batch:>2} (load {os.getloadavg()[0]:.2f}): {cells}", flush=True)


if __name__ == "__main__":
    main()
