"""How many CPU threads the engine's kernels use.

torch runs its CPU kernels on an OpenMP pool (GNU libgomp in the PyPI wheels), and a decode step
of a small model is a few hundred short parallel regions, each ending at a barrier. When another
process holds one of the cores, the worker that shares it is descheduled for whole time slices and
every region waits for it: measured on the 2-core development machine (``python -m
experiments.bench_threads``, 2026-12-02), single-stream decode with 2 threads fell from 99 to 27
tokens/s beside one busy process (0.27x), with 1 thread it ran at 67 either way. No wait policy
saves the 2-thread case (spinning forever: 32 tokens/s; sleeping at once,
``OMP_WAIT_POLICY=PASSIVE``: 56 busy but 47 quiet, since every region then pays a wake-up). With
the default below: 92 quiet, 68 busy (0.74x).

So :func:`configure` gives torch one thread per core that is free when the engine starts: the
cores this process may run on (``os.sched_getaffinity``: a container or ``taskset`` limit counts)
minus the cores other processes kept busy over a short sample of ``/proc/stat``. ``runtime.threads``
overrides it. Load that arrives after the engine started is not seen.
"""

from __future__ import annotations

import os
import time


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine, in clock ticks, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = 0.2) -> float:
    """Cores other processes keep busy, measured over ``sample_s`` (0 where not measurable)."""
    try:
        busy0, total0 = _busy_jiffies()
        own0 = sum(os.times()[:2])
        time.sleep(sample_s)
        busy1, total1 = _busy_jiffies()
        own1 = sum(os.times()[:2])
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    cores = os.cpu_count() or 1
    machine = (busy1 - busy0) / (total1 - total0) * cores  # cores busy, this process included
    return max(0.0, machine - (own1 - own0) / sample_s)


def default_threads() -> int:
    """One thread per core of this process's that other processes leave free (at least one)."""
    cores = available_cores()
    return max(1, cores - int(busy_cores() + 0.5))


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`default_threads`); returns
    the count in effect."""
    import torch

    wanted = threads or default_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted
