"""Where a run's wall time goes, by component: a sampling profiler for the experiments.

:class:`TimeSplit` is a context manager for the main thread. While it is open, a profiling
timer (``setitimer(ITIMER_PROF)``, the process's CPU time) interrupts the run every
``interval`` seconds and the signal handler charges the frame it interrupted to the component
of the innermost frame that belongs to one (:data:`COMPONENTS`: the oracle, the memory manager,
the prefix cache, the modeled engine, the DES, the world...). A frame of the standard library or
a dependency counts for the project frame that called it, so a ``heapq`` call inside the oracle
is the oracle's time.

A signal rather than a sampling thread: a thread only gets the interpreter lock where the run
lets it go, and code that releases it (hashing a few kilobytes does) drew most samples to
itself: a thread put the prefix cache at 46% of a run where a sampling profiler outside the
process measured 10%. Sampling rather than instrumenting: nothing in the hot paths changes, and
the cost is one stack walk per sample. The shares are estimates: with ``n`` samples a share
``p`` is good to about ``sqrt(p (1 - p) / n)``.
"""

from __future__ import annotations

import signal
from collections import Counter
from types import FrameType, TracebackType
from typing import Any

#: Component of a source file, by the first prefix (a path inside the repository) it starts with.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("scalesim/distance.py", "oracle"),
    ("scalesim/call_rates.py", "oracle"),
    ("scalesim/prediction_quality.py", "oracle"),
    ("scalesim/turns.py", "oracle"),
    ("runtime/prefix_cache.py", "prefix cache"),
    ("runtime/memory/", "memory manager"),
    ("runtime/admission.py", "memory manager"),
    ("runtime/executors/", "modeled engine"),
    ("runtime/", "modeled engine"),
    ("scalesim/environment.py", "DES"),
    ("scalesim/agent.py", "DES"),
    ("scalesim/timed_receive.py", "DES"),
    ("simpy/", "DES"),
    ("scalesim/trace.py", "trace"),
    ("scalesim/", "other scalesim"),
    ("worlds/", "world"),
    ("agents/", "world"),
)


def component(filename: str) -> str | None:
    """The component ``filename`` belongs to (``None``: none, e.g. the standard library)."""
    path = filename.replace("\\", "/")
    for prefix, name in COMPONENTS:
        if f"/{prefix}" in path:
            return name
    return None


class TimeSplit:
    """Samples the main thread while open; :meth:`shares` is the split once it is closed."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: Counter[str] = Counter()
        self._names: dict[str, str | None] = {}  # filename -> component, looked up once
        self._previous: Any = None

    def __enter__(self) -> TimeSplit:
        self._previous = signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, self._previous or signal.SIG_DFL)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        self.samples[self._charge(frame)] += 1

    def _charge(self, frame: FrameType | None) -> str:
        names = self._names
        while frame is not None:
            filename = frame.f_code.co_filename
            name = names.get(filename, "?")
            if name == "?":
                name = names[filename] = component(filename)
            if name is not None:
                return name
            frame = frame.f_back
        return "other"

    def shares(self) -> dict[str, float]:
        """Each component's share of the samples, largest first (rounded to 0.001)."""
        total = sum(self.samples.values())
        if not total:
            return {}
        return {name: round(n / total, 3) for name, n in self.samples.most_common()}

    def summary(self) -> dict[str, Any]:
        return {"samples": sum(self.samples.values()), "interval_s": self.interval,
                "shares": self.shares()}
