"""Everything the project checks on a lent GPU, in one run of a few minutes.

A GPU machine is lent now and then for a few minutes in all, so every GPU check is prepared and
tested on the CPU first and runs here as one script that writes what it finds as it goes
(``--out``: ``gpu_check.json``, one log per step) and gives each step a deadline, so that a step
that fails or runs long costs only itself. The steps, in order:

1. ``env``: torch, CUDA, the device, nvcc, whether flashinfer imports; flashinfer's kernels for
   the head sizes used below are compiled (JIT) in a background process meanwhile.
2. ``calibrate``: the torch executor (``--model``, random weights, bfloat16, torch attention)
   serves batches of known shapes (:mod:`experiments.calibrate`); each step's measured time
   against the cost model's hardware row ``--row`` (modeled), and the row's efficiencies and
   overheads fitted to the measurements.
3. ``pytest``: ``tests/test_cuda.py -m cuda`` (logits against transformers, flashinfer against
   the reference attention, multi-LoRA against peft, copy-stream reloads), once flashinfer's
   kernels are built.
4. ``generate``: :mod:`experiments.bench_generate`, the engine (torch and flashinfer attention)
   against transformers' batched ``generate`` with peft, for each ``--generate`` setting.
5. ``memory_wall``: :mod:`experiments.bench_memory_wall` with a pinned host tier and a device
   budget of a quarter of the agents' memory: lru, scalesim, belady, infinite, recompute.

    python -m experiments.gpu_check --out DIR                 # on the GPU machine
    python -m experiments.gpu_check --out DIR --device cpu --quick   # the same steps here, small

Nothing here is modeled except the cost model's predictions in step 2, which say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

#: (model, comma-separated agent counts) of each engine-vs-transformers comparison on a GPU
GENERATE = [("qwen2.5-0.5b", "32,128"), ("qwen2.5-7b", "32")]


class Report:
    """The results so far, rewritten to ``gpu_check.json`` after every step."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out, self.deadline = out, deadline
        self.results: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, run: Callable[[], Any], needs: float = 0.0) -> Any:
        """Run one step, record its result or its error, and save; skip it when fewer than
        ``needs`` seconds are left."""
        if self.left() < needs:
            self.results[name] = {"skipped": f"{self.left():.0f} s left, needs {needs:.0f}"}
            self.save()
            return None
        start = time.monotonic()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            value = run()
            self.results[name] = {"seconds": round(time.monotonic() - start, 1), "result": value}
        except Exception as exc:  # a failed step is a finding; the others still run
            value = None
            self.results[name] = {"seconds": round(time.monotonic() - start, 1),
                                  "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-4000:]}
        print(f"   {name}: {json.dumps(self.results[name], default=str)[:1500]}", flush=True)
        self.save()
        return value

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def sub(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``command`` (a Python module and its arguments) in a subprocess with a deadline;
    return its exit status and its last JSON line (an experiment's headline)."""
    with log.open("w") as f:
        try:
            done = subprocess.run([sys.executable, *command], stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, timeout))
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = log.read_text(errors="replace").splitlines()
    last = next((line for line in reversed(lines) if line.startswith("{")), None)
    result: dict[str, Any] = {"rc": rc}
    if last:
        try:
            result["headline"] = json.loads(last)
        except json.JSONDecodeError:
            pass
    if rc != 0:
        result["tail"] = "\n".join(lines[-25:])
    return result


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        try:
            info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                          timeout=20).stdout.strip().splitlines()[-1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvcc"] = f"unavailable: {exc}"
    try:
        import flashinfer

        info["flashinfer"] = flashinfer.__version__
    except Exception as exc:
        info["flashinfer"] = f"does not import: {type(exc).__name__}: {exc}"
    return info


def warm_flashinfer(dtype: str) -> None:
    """Build (JIT) and run flashinfer's paged prefill kernel for head sizes 64 and 128."""
    from runtime.kv_cache import KVCache
    from runtime.model.attention import BatchLayout, FlashInferAttention

    for heads, kv_heads, head_dim in ((14, 2, 64), (28, 4, 128), (8, 2, 64), (8, 2, 128)):
        for dt in (dtype, "float16"):
            cache = KVCache(1, 8, 16, kv_heads, head_dim, dtype=getattr(torch, dt), device="cuda")
            attention = FlashInferAttention(cache, heads, kv_heads, head_dim)
            attention.plan(BatchLayout([5, 1], [0, 20], [[0], [1, 2]]))
            q = torch.randn(6, heads, head_dim, dtype=getattr(torch, dt), device="cuda")
            attention.forward(0, q, q[:, :kv_heads], q[:, :kv_heads])
            torch.cuda.synchronize()
            print(f"flashinfer ready: heads {heads}/{kv_heads}, head_dim {head_dim}, {dt}",
                  flush=True)


def calibrate(model: str, device: str, dtype: str, row: str, quick: bool) -> dict[str, Any]:
    """Measured step times against the cost model's row (modeled), and the row refitted."""
    import numpy as np

    from experiments.calibrate import fit, measure
    from runtime.cost_model import CostModel, hardware
    from runtime.model.profiles import profile

    samples = measure(quick, model=model, device=device, dtype=dtype, random_weights=True,
                      attention="torch")
    measured = np.array([s for _, s in samples])
    table = CostModel(hardware(row), profile(model), getattr(torch, dtype).itemsize)
    modeled = np.array([table.step_seconds(w) for w, _ in samples])
    params, _, fitted = fit(samples, row, model, getattr(torch, dtype).itemsize)
    ratio = modeled / measured
    return {"steps": len(samples), "row": row, "model": model,
            "table_modeled_over_measured_median": round(float(np.median(ratio)), 3),
            "table_modeled_over_measured_min": round(float(ratio.min()), 3),
            "table_modeled_over_measured_max": round(float(ratio.max()), 3),
            "table_mean_rel_error": round(float(np.mean(np.abs(modeled - measured) / measured)), 4),
            "fitted": params,
            "fitted_mean_rel_error": round(float(np.mean(np.abs(fitted - measured) / measured)), 4),
            "samples": [{"seqs": len(w), "new": sum(x.new for x in w),
                         "context": sum(x.past + x.new for x in w),
                         "measured_s": round(float(m), 6), "table_s": round(float(t), 6)}
                        for (w, _), m, t in zip(samples, measured, modeled)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default="qwen2.5-7b", help="profile of calibrate and the wall")
    parser.add_argument("--row", default="H100", help="the cost model's hardware row")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a CPU dry run)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, time.monotonic() + args.budget_s)
    skip = set(filter(None, args.skip.split(",")))
    cuda = args.device.startswith("cuda")
    env = report.step("env", lambda: environment(args.device))
    flashinfer = cuda and isinstance(env, dict) and not str(env.get("flashinfer", "")).startswith(
        "does not import")
    warm = None
    if flashinfer:
        warm = subprocess.Popen(
            [sys.executable, "-c", f"from experiments.gpu_check import warm_flashinfer; "
             f"warm_flashinfer({args.dtype!r})"],
            stdout=(out / "flashinfer_jit.log").open("w"), stderr=subprocess.STDOUT)
    model = "smollm2-135m" if args.quick else args.model
    if "calibrate" not in skip:
        report.step("calibrate", lambda: calibrate(model, args.device, args.dtype, args.row,
                                                   args.quick), needs=60)
    attention = ["torch"]
    if warm is not None:
        def wait() -> dict[str, Any]:
            try:
                rc = warm.wait(timeout=max(1.0, report.left() - 240))
            except subprocess.TimeoutExpired:
                warm.kill()
                rc = "timeout"
            return {"rc": rc, "log": (out / "flashinfer_jit.log").read_text()[-3000:]}

        built = report.step("flashinfer_jit", wait)
        if built and built["rc"] == 0:
            attention.append("flashinfer")
    if "pytest" not in skip:
        report.step("pytest", lambda: sub(
            ["-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
             "tests/test_cuda.py"] + (["-m", "cuda"] if cuda else []),
            out / "pytest.log", min(150.0, report.left() - 200)), needs=30)
    settings = [("smollm2-135m", "2")] if args.quick else GENERATE
    if "generate" not in skip:
        for name, agents in settings:
            report.step(f"generate_{name}", lambda name=name, agents=agents: sub(
                ["-m", "experiments.bench_generate", "--model", name, "--device", args.device,
                 "--dtype", args.dtype, "--agents", agents, "--attention", ",".join(attention)]
                + (["--quick"] if args.quick else []),
                out / f"generate_{name}.log", min(150.0, report.left() - 100)), needs=40)
    if "memory_wall" not in skip:
        wall = ["experiments/bench_memory_wall.py", "--tier", "host", "--random-weights",
                "--model", model, "--device", args.device, "--dtype", args.dtype,
                "--attention", attention[-1]]
        # Text is bytes here: 500 "tokens" of persona text are ~2,200 byte tokens of KV.
        wall += ["--quick"] if args.quick else ["--agents", "32", "--persona-tokens", "500"]
        report.step("memory_wall", lambda: sub(wall, out / "memory_wall.log",
                                               report.left() - 5), needs=60)
    print(json.dumps({k: ("error" if "error" in v else "ok") for k, v in report.results.items()}))
    return report.results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
