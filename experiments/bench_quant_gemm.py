"""The projections of one decode step, kernel against kernel, side by side in one process.

For SmolLM2-135M's shapes (q/k/v, o, gate/up, down: 30 layers each, and the 49152-row vocabulary
projection) and a few step sizes, times every way :mod:`runtime.model.weights` can multiply:
dense float32 (oneDNN), dense bfloat16 (``F.linear``), torch's weight-only int8 and int4 kernels
(bfloat16 activations, as in a bfloat16 model: the formats ``int8`` / ``int4``), and the compiled activation-quantized
``scalesim::q8_linear`` with 8- and 4-bit weights (``int8x8`` / ``int4x8``), on each path this
CPU runs. Weights are random (speed does not depend on their values). The kinds are timed in
alternating rounds and each kind's median per step is reported, with its ratio to weight-only
int4 (the format the engine used before) measured in the same rounds.

    python -m experiments.bench_quant_gemm [--rows 1,8,16,32] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.model.kernels import cpu_op
from runtime.model.weights import (ActQuantProjection, Int4Projection, Int8Projection,
                                   make_projection, select_gemm)

#: (name, out, in, count per step): SmolLM2-135M
SHAPES = [("qkv", 960, 576, 30), ("o", 576, 576, 30), ("gate_up", 3072, 576, 30),
          ("down", 576, 1536, 30), ("lm_head", 49152, 576, 1)]


def kinds(isas: list[str]) -> dict[str, Callable[[torch.Tensor], Callable]]:
    """Per kind: a builder from a float32 weight to the projection (a callable of activations)."""
    gemm = select_gemm(torch.device("cpu"), torch.float32)
    built: dict[str, Callable[[torch.Tensor], Callable]] = {
        "float32": lambda w: make_projection(w, None, "none", torch.float32, gemm),
        "bf16": lambda w: make_projection(w, None, "none", torch.bfloat16, F.linear),
        "int8 (w-only)": lambda w: Int8Projection(w, None, dense_from=0),
        "int4 (w-only)": lambda w: Int4Projection(w, None, dense_from=0),
    }
    for isa in isas:
        for bits in (8, 4):
            built[f"int{bits}x8 {isa}"] = (lambda b, i: lambda w: _with_isa(
                ActQuantProjection(w, None, b), i))(bits, isa)
    return built


def _with_isa(projection: ActQuantProjection, isa: str) -> Callable:
    """The projection, run on kernel path ``isa`` (selected before every call)."""

    def call(x: torch.Tensor) -> torch.Tensor:
        torch.ops.scalesim.quant_isa(isa)
        return projection(x)
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,32", help="step sizes (tokens), comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="0: the cores this process may use")
    parser.add_argument("--kinds", default="", help="comma-separated subset of the kinds")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    isas = []
    if cpu_op("q8_linear") is not None:
        isas = sorted({"portable", torch.ops.scalesim.quant_isa("auto")})
    table = kinds(isas)
    if args.kinds:
        table = {k: v for k, v in table.items() if k in args.kinds.split(",")}
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, k, generator=gen) * 0.02 for name, n, k, _ in SHAPES}
    projections = {kind: {name: build(w) for name, w in weights.items()}
                   for kind, build in table.items()}
    print(f"{threads} threads; load average {os.getloadavg()[0]:.2f}; per decode step (30 layers "
          f"+ vocabulary), median of {args.rounds} alternating rounds", flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {name: torch.randn(rows, k, generator=gen) for name, _, k, _ in SHAPES}
        times: dict[str, dict[str, list[float]]] = {kind: {name: [] for name, *_ in SHAPES}
                                                    for kind in table}
        for round_ in range(args.rounds + 1):
            order = list(table) if round_ % 2 == 0 else list(reversed(table))
            for kind in order:
                for name, _, _, count in SHAPES:
                    # The model's activations: float32 for the reference, bfloat16 otherwise.
                    p, x = projections[kind][name], xs[name].to(
                        torch.float32 if kind == "float32" else torch.bfloat16)
                    reps = max(3, min(count, 30))
                    start = time.perf_counter()
                    for _ in range(reps):
                        p(x)
                    if round_ > 0:  # the first round warms up
                        times[kind][name].append((time.perf_counter() - start) / reps * count)
        base = {name: statistics.median(times["int4 (w-only)"][name]) for name, *_ in SHAPES} \
            if "int4 (w-only)" in times else None
        print(f"\nrows {rows} (load {os.getloadavg()[0]:.2f}): ms per step; x = speed-up over "
              "int4 (w-only)")
        print(f"{'kind':>24} " + " ".join(f"{name:>14}" for name, *_ in SHAPES) + f" {'total':>14}")
        for kind, per in times.items():
            med = {name: statistics.median(v) * 1e3 for name, v in per.items()}
            total = sum(med.values())
            cells = []
            for name, ms in med.items():
                ratio = f" {base[name] * 1e3 / ms:4.1f}x" if base else ""
                cells.append(f"{ms:8.2f}{ratio}")
            ratio_total = f" {sum(base.values()) * 1e3 / total:4.1f}x" if base else ""
            print(f"{kind:>24} " + " ".join(f"{c:>14}" for c in cells) +
                  f" {f'{total:8.2f}{ratio_total}':>14}", flush=True)


if __name__ == "__main__":
    main()
