"""The engine's CPU threads: how many, and how idle ones wait.

torch runs its CPU kernels on an OpenMP pool (GNU libgomp in the PyPI wheels), and a decode step
of a small model is a few hundred short parallel regions. Two things decide how that behaves on
a machine the engine shares with other processes:

- the thread count: :func:`configure` sets torch's to the cores this process may run on
  (``os.sched_getaffinity``; a container or ``taskset`` limit counts), or to ``runtime.threads``;
- the wait policy: a worker that reaches a region's barrier first spins for a while before it
  sleeps. Spinning makes back-to-back regions cheap on idle cores, but when another process holds
  one of the cores, the spinning worker burns the core its descheduled sibling needs, and every
  region of a step waits a scheduler time slice. :data:`SPIN_COUNT` bounds the spin (libgomp's
  ``GOMP_SPINCOUNT``; the default spins 300,000 times, ``OMP_WAIT_POLICY=ACTIVE`` forever).

The policy is read once, when libgomp loads (at ``import torch``), so :func:`set_wait_policy`
runs when ``runtime`` is imported and only sets what the user has not: an ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` in the environment wins, and a process that imported torch before
``runtime`` keeps torch's defaults. ``python -m experiments.bench_threads`` measures the settings
alone and beside a busy process.
"""

from __future__ import annotations

import os
import sys

#: spins before an idle OpenMP worker sleeps (see the module docstring and experiments/README.md)
SPIN_COUNT = "10000"


def set_wait_policy() -> None:
    """Bound libgomp's spin-wait unless the environment chose a policy (before torch loads)."""
    if "torch" in sys.modules:
        return
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`available_cores`); returns
    the count in effect."""
    import torch

    wanted = threads or available_cores()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted
