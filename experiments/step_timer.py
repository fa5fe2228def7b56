"""Timing an executor's forward passes from outside, for the measured experiments.

:func:`time_steps` wraps ``executor.execute`` (one engine iteration's forward pass) so that every
call adds to a :class:`StepTimes`: wall seconds inside ``execute``, the number of iterations and
the sequences they carried. World and scheduling time stay outside the count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class StepTimes:
    seconds: float = 0.0
    steps: int = 0
    sequences: int = 0

    def reset(self) -> None:
        self.seconds, self.steps, self.sequences = 0.0, 0, 0

    @property
    def mean_batch(self) -> float:
        return self.sequences / self.steps if self.steps else 0.0


def time_steps(executor: Any) -> StepTimes:
    """Make ``executor.execute`` count into the returned :class:`StepTimes`."""
    times = StepTimes()
    execute = executor.execute

    def timed_execute(batch):
        start = time.perf_counter()
        try:
            return execute(batch)
        finally:
            times.seconds += time.perf_counter() - start
            times.steps += 1
            times.sequences += len(batch)

    executor.execute = timed_execute
    return times
