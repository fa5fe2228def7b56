"""Fit the ``cpu`` hardware profile of the cost model to measured steps of the torch executor.

The torch executor (SmolLM2-135M, float32, this machine) serves batches of a range of shapes:
single prefills of growing length, decode batches of growing size and context, and mixes. Calls
come in groups of like calls that prefill in one step and decode in lockstep (:class:`Group`), so
each step's work (new tokens and context per sequence) is known from the groups in it; its
forward pass is timed by the engine (:class:`runtime.interface.StepTimed`, through
``engine.listen``), which also reports its counts of sequences and tokens, checked against the
groups. The fit
searches the compute and memory efficiencies on a log grid and solves the per-step and
per-sequence overheads by least squares on relative error; it reports the fitted profile and the
fit error (mean and max relative error, measured vs modeled), writes
``results/calibrate.csv`` / ``.png`` (``results/quick/`` with ``--quick``) and ends with one JSON
line.

It also measures the disk tier: object files of 1 to 256 MiB are written and read back the way
the memory manager does (direct I/O, checksum), in ``--disk-dir`` (default: a temporary
directory under ``$SCALESIM_CACHE``, i.e. where a store would live), and a per-read latency plus
bytes over bandwidth is fitted to the reads (``disk_latency``, ``disk_bw`` of the profile).

    python -m experiments.calibrate [--quick] [--disk-dir DIR] [--disk-only]

Other processes on the machine make the measurements noisy; the fit error says how much.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from experiments.harness import headline, machine_peaks
from experiments.results_dir import results_dir
from runtime.cost_model import CostModel, SeqWork, hardware
from runtime.model.profiles import profile



#: tokens one engine iteration may compute: every group's prefill fits one step (see Group)
MAX_BATCH_TOKENS = 8192
WORD = "the village square is busy today and "
#: a word for a model that reads bytes (random weights): about as many tokens as WORD's BPE
BYTE_WORD = "village "


@dataclass(frozen=True)
class Group:
    """``n`` like calls served together: ``words`` words of prompt after a persona of ``persona``
    words, ``max_tokens`` output tokens each (EOS ignored).

    Their prompts have one length and the whole group's prefill fits one iteration, so they
    prefill in one step and then decode in lockstep, one token each a step: the shape of every
    step is known from the group alone. ``after`` submits the group that many iterations into
    its serve, so that its prefill runs in one step with the others' decodes (a mix).
    """

    n: int
    words: int
    max_tokens: int
    persona: int = 0
    after: int = 0


@dataclass
class _Running:
    group: Group
    prompt_tokens: int
    #: decode steps done (-1: not prefilled yet)
    decoded: int = -1


def _members(engine: Any, g: int, group: Group, word: str) -> list[tuple[str, str, str]]:
    """``(agent, prefix, prompt)`` of the group's ``n`` calls: texts that start with a tag of
    their own (so the prefix cache shares no KV between them: each computes its whole prompt),
    of one token length (tags whose texts tokenize to another length are skipped). The same
    group index gives the same agents and texts, so a group served again finds its own KV."""
    members: list[tuple[str, str, str]] = []
    length = None
    k = 0
    while len(members) < group.n:
        tag = f"[{g}.{k}] "
        prefix = tag + word * group.persona if group.persona else ""
        prompt = word * group.words if group.persona else tag + word * group.words
        n = engine.prompt_tokens(prefix, prompt)
        length = n if length is None else length
        if n == length:
            members.append((f"cal{g}-{k}", prefix, prompt))
        k += 1
        if k > 100 * group.n:
            raise RuntimeError(f"no {group.n} tags of one token length for {group}")
    return members


def serve(engine: Any, steps: list[Any], groups: list[Group],
          samples: list[tuple[list[SeqWork], float]], word: str = WORD) -> None:
    """Serve ``groups`` (agents ``cal<g>-<i>``, so a persona group served again finds its
    personas cached) and add every timed step's work and forward-pass seconds to ``samples``;
    ``steps`` is where the engine's listener puts its :class:`~runtime.interface.StepTimed`.

    The work of a step follows from the groups in it: a prefilling group's sequences each
    compute the step's prefill tokens shared among them, after the persona tokens found cached;
    a decoding group's compute one token after their prompt and the tokens decoded so far. Each
    step's counts are checked against what the engine reports.
    """
    from runtime.request import Request, SamplingParams

    due = sorted(enumerate(groups), key=lambda item: item[1].after)
    running: list[_Running] = []
    iteration = 0
    while due or engine.has_work():
        while due and due[0][1].after <= iteration:
            g, group = due.pop(0)
            members = _members(engine, g, group, word)
            length = engine.prompt_tokens(*members[0][1:])
            if group.n * length > MAX_BATCH_TOKENS:
                raise ValueError(f"{group} needs {group.n * length} tokens in one step, more than "
                                 f"{MAX_BATCH_TOKENS}")
            for agent, prefix, prompt in members:
                engine.submit(Request(agent, prompt, prefix=prefix, sampling=SamplingParams(
                    max_tokens=group.max_tokens, ignore_eos=True)))
            running.append(_Running(group, length))
        before = len(steps)
        engine.step()
        iteration += 1
        if len(steps) == before:
            continue
        step = steps[before]
        prefilling = [r for r in running if r.decoded < 0]
        decoding = [r for r in running if r.decoded >= 0]
        prefill_seqs = sum(r.group.n for r in prefilling)
        decode_seqs = sum(r.group.n for r in decoding)
        shared = (step.prefill_tokens % prefill_seqs == 0 if prefill_seqs
                  else step.prefill_tokens == 0)
        if (len(prefilling) > 1 or not shared or step.sequences != prefill_seqs + decode_seqs
                or step.tokens - step.prefill_tokens != decode_seqs):
            raise RuntimeError(f"iteration {iteration} ran {step}, not the lockstep groups "
                               f"{[r.group for r in running]}: the scheduler no longer serves "
                               "them as calibrate assumes")
        work = [SeqWork(new=1, past=r.prompt_tokens + r.decoded) for r in decoding
                for _ in range(r.group.n)]
        for r in prefilling:
            new = step.prefill_tokens // prefill_seqs
            work += [SeqWork(new=new, past=r.prompt_tokens - new)] * r.group.n
        samples.append((work, step.wall_s))
        for r in running:
            r.decoded += 1
        running = [r for r in running if r.decoded < r.group.max_tokens - 1]


def shapes(quick: bool, accelerator: bool = False) -> list[list[Group]]:
    """The groups served, one list per serve.

    Single prefills of growing length; decode batches of growing size and context; agents with a
    persona prefix, served twice: the second time the persona's KV is cached and the prompt is
    prefilled after it (long-context prefills, as in a debate's transcript); and mixes, one
    group's prefill in the steps of another's decodes. An accelerator gets wider batches (up
    to 128 sequences: where a GPU's steps stop being bound by reading the weights).
    """
    if quick:
        return [[Group(1, 4, 2)], [Group(1, 48, 2)], [Group(4, 4, 3)], [Group(2, 40, 2)],
                [Group(2, 20, 2, 60)], [Group(2, 20, 2, 60)],
                [Group(2, 4, 4), Group(1, 20, 2, after=1)]]
    found = [[Group(1, w, 2)] for w in (4, 16, 48, 96)] + [[Group(b, 4, 12)] for b in (2, 8, 24)]
    found += [[Group(b, 40, 8)] for b in (4, 16)]
    found += [[Group(b, 60, 4, 120)] for b in (1, 4)] * 2
    found += [[Group(8, 4, 12), Group(1, 48, 2, after=3)],
              [Group(16, 4, 12), Group(2, 40, 2, after=4)]]
    found += [[Group(4, 4, 12), Group(2, 60, 4, 120, after=2)]] * 2
    if accelerator:
        found += [[Group(b, 4, 12)] for b in (48, 96, 128)] + [[Group(64, 12, 8)]]
        found += [[Group(1, w, 2)] for w in (200, 400)] + [[Group(8, 100, 4)]]
        found += [[Group(64, 4, 12), Group(2, 150, 2, after=3)]]
    return found


def measure(quick: bool, model: str = "smollm2-135m", device: str = "cpu",
            dtype: str = "float32", random_weights: bool = False,
            **engine_options: Any) -> list[tuple[list[SeqWork], float]]:
    """Serve calls of many shapes on the torch executor; return (work, seconds) for every timed
    step (the warm-up's aside). ``random_weights``: the profile ``model`` with random weights
    (its text is served as bytes, so a word is more tokens than with a tokenizer)."""
    import torch

    from runtime.engine import build_engine
    from runtime.interface import EngineEvent, StepTimed

    if device == "cpu":
        torch.set_num_threads(2)
    engine = build_engine("torch", model=model, device=device, dtype=dtype,
                          random_weights=random_weights, max_num_seqs=128,
                          max_batch_tokens=MAX_BATCH_TOKENS, **engine_options)
    steps: list[StepTimed] = []

    def note(event: EngineEvent) -> None:
        if isinstance(event, StepTimed):
            steps.append(event)

    engine.listen(note)
    samples: list[tuple[list[SeqWork], float]] = []
    word = BYTE_WORD if random_weights else WORD
    serve(engine, steps, [Group(1, 4, 2)], [], word)  # warm-up, not kept
    serve(engine, steps, [Group(8, 4, 3)], [], word)
    for groups in shapes(quick, accelerator=device != "cpu"):
        serve(engine, steps, groups, samples, word)
    engine.close()
    return samples


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def measure_disk(directory: Path, quick: bool) -> dict[str, float]:
    """Time object-file reads of several sizes in ``directory``; fit latency + bytes / bandwidth."""
    import torch

    from runtime.memory.object_file import read_object, write_object

    sizes = [1, 4, 16, 64] if quick else [1, 4, 16, 64, 128, 256]
    repeats = 2 if quick else 4
    directory.mkdir(parents=True, exist_ok=True)
    points: list[tuple[int, float]] = []
    write_s = write_bytes = 0.0
    for mib in sizes:
        path = directory / f"calibrate-{mib}.obj"
        tensors = {"k": torch.randn(mib << 18)}  # float32: mib MiB
        start = time.perf_counter()
        nbytes = write_object(path, tensors, {"calibrate": mib})
        write_s += time.perf_counter() - start
        write_bytes += nbytes
        for _ in range(repeats):
            start = time.perf_counter()
            read_object(path, {"calibrate": mib})
            points.append((nbytes, time.perf_counter() - start))
        path.unlink()
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1, w=1 / y)  # least squares on relative error
    pred = intercept + slope * x
    rel = np.abs(pred - y) / y
    return {"disk_bw": float(f"{1 / slope:.3g}"), "disk_latency": float(f"{max(0.0, intercept):.3g}"),
            "disk_write_bw": float(f"{write_bytes / write_s:.3g}"),
            "disk_reads": len(points), "disk_mean_rel_error": round(float(rel.mean()), 4),
            "disk_max_rel_error": round(float(rel.max()), 4)}


def fit(samples: list[tuple[list[SeqWork], float]], row: str = "cpu",
        model_name: str = "smollm2-135m", dtype_bytes: int | None = None
        ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Grid-search the efficiencies of hardware ``row``, least-squares its overheads, for the
    steps of ``model_name``; return params, measured, modeled."""
    base = hardware(row)
    model = profile(model_name)
    measured = np.array([s for _, s in samples])
    nseq = np.array([len(w) for w, _ in samples], dtype=float)
    raw = CostModel(replace(base, eff_compute=1.0, eff_memory=1.0, step_overhead=0.0,
                            seq_overhead=0.0), model, dtype_bytes)
    parts = [raw.step(w) for w, _ in samples]
    comp = np.array([p.compute_s for p in parts])
    mem = np.array([p.memory_s for p in parts])
    best = None
    for ec in np.geomspace(0.01, 4.0, 60):
        for em in np.geomspace(0.01, 4.0, 60):
            roof = np.maximum(comp / ec, mem / em)
            # Relative-error least squares for the two overheads: (roof + a + b n - y) / y.
            A = np.stack([1 / measured, nseq / measured], axis=1)
            rhs = 1 - roof / measured
            coef, *_ = np.linalg.lstsq(A, rhs, rcond=None)
            coef = np.maximum(coef, 0.0)
            pred = roof + coef[0] + coef[1] * nseq
            err = float(np.mean(np.abs(pred - measured) / measured))
            if best is None or err < best[0]:
                best = (err, ec, em, coef, pred)
    assert best is not None
    err, ec, em, coef, pred = best
    params = {"eff_compute": round(float(ec), 4), "eff_memory": round(float(em), 4),
              "step_overhead": float(f"{coef[0]:.3g}"), "seq_overhead": float(f"{coef[1]:.3g}")}
    return params, measured, pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch shapes")
    parser.add_argument("--disk-dir", default=None, help="where to time disk-tier reads")
    parser.add_argument("--disk-only", action="store_true", help="only the disk tier")
    args = parser.parse_args()
    results = results_dir(args.quick)
    from runtime.model.loader import cache_dir

    scratch = Path(args.disk_dir) if args.disk_dir else \
        Path(tempfile.mkdtemp(prefix="calibrate-disk-", dir=_made(cache_dir())))
    disk = measure_disk(scratch, args.quick)
    if not args.disk_dir:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"disk tier (direct I/O reads of object files): bandwidth {disk['disk_bw'] / 1e9:.2f} "
          f"GB/s, latency {disk['disk_latency'] * 1e3:.2f} ms per read; writes "
          f"{disk['disk_write_bw'] / 1e9:.2f} GB/s; fit error mean "
          f"{disk['disk_mean_rel_error']:.1%}", flush=True)
    if args.disk_only:
        headline({"experiment": "calibrate", **disk})
        return
    peaks = machine_peaks()
    print(f"peaks: float32 GEMM {peaks['gflops_float32']:.0f} GFLOP/s, bfloat16 GEMM "
          f"{peaks['gflops_bfloat16']:.0f} GFLOP/s, memory copy {peaks['mem_gbps']:.1f} GB/s",
          flush=True)
    t0 = time.perf_counter()
    samples = measure(args.quick)
    params, measured, pred = fit(samples)
    rel = np.abs(pred - measured) / measured
    current = CostModel(hardware("cpu"), profile("smollm2-135m"))
    table_pred = np.array([current.step_seconds(w) for w, _ in samples])
    table_err = float(np.mean(np.abs(table_pred - measured) / measured))

    import pandas as pd

    rows = pd.DataFrame({
        "seqs": [len(w) for w, _ in samples],
        "new_tokens": [sum(x.new for x in w) for w, _ in samples],
        "context_tokens": [sum(x.past + x.new for x in w) for w, _ in samples],
        "measured_s": measured, "fitted_modeled_s": pred, "table_modeled_s": table_pred,
        "rel_error": rel})
    rows.to_csv(results / "calibrate.csv", index=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.loglog(measured, pred, "o", ms=4, label="fitted cpu profile (modeled)")
    lo, hi = measured.min() * 0.8, measured.max() * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("measured step time, torch executor (s)")
    ax.set_ylabel("modeled step time (s)")
    ax.set_title(f"cost model fit, SmolLM2-135M on CPU\nmean rel. error {rel.mean():.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "calibrate.png", dpi=120)

    print(f"{len(samples)} steps measured in {time.perf_counter() - t0:.1f} s")
    print(f"fitted cpu profile: {params}")
    print(f"fit error (modeled vs measured): mean {rel.mean():.1%}, max {rel.max():.1%}; "
          f"profile currently in runtime/cost_model.py: mean {table_err:.1%}")
    headline({"experiment": "calibrate", "steps": len(samples), **params, **peaks,
              "mean_rel_error": round(float(rel.mean()), 4),
              "max_rel_error": round(float(rel.max()), 4),
              "table_mean_rel_error": round(table_err, 4), **disk})


if __name__ == "__main__":
    main()
