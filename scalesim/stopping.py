"""How a run stops before its end: on a signal, or because too many of its calls failed.

SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, systemd, Docker, Kubernetes, SLURM) and SIGHUP
(a closed terminal) all stop a run the same way. While :class:`StopSignals` is active (around
:func:`scalesim.simulate`), a first signal during the run is only noted: the clock loop stops at
its next safe point (between two steps, so no engine iteration is cut in half), the run
directory is written with status ``interrupted`` and :class:`RunInterrupted` is raised. A signal
outside the clock loop (while the model loads, say), or a second signal, raises at once. The
handlers in place before are restored afterwards.

:class:`RunFailed` is raised when a run breaks its failure policy (``run.max_failed_fraction``,
``run.fail_fast``); it carries the run's result, written like any other.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from scalesim.trace import RunResult

#: The signals that stop a run cleanly (SIGHUP does not exist on Windows).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGHUP"))
    if s is not None)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal.

    A :class:`KeyboardInterrupt`, so code that already cleans up after Ctrl-C does so after
    SIGTERM and SIGHUP too.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        #: What the run wrote, once written (None when stopped before the run started).
        self.result: RunResult | None = None
        super().__init__(signal_name(signum))

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


class RunFailed(RuntimeError):
    """The run broke its failure policy, or the world's code raised :attr:`cause` (the message
    then names the world's line); :attr:`result` is what it wrote (set once written)."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.result: RunResult | None = None
        self.cause = cause


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Route :data:`STOP_SIGNALS` to ``defer`` while active; restore the old handlers after.

    ``defer(exc)`` is called from the handler with the :class:`RunInterrupted` to raise; it
    returns True when the run took note and will raise it at its next safe point, False when the
    handler should raise it at once. Outside the main thread (where Python allows no signal
    handlers) this does nothing.
    """

    def __init__(self, defer: Callable[[RunInterrupted], bool]) -> None:
        self.defer = defer
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            # None: the old handler was installed from C and cannot be put back; use the default.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        exc = RunInterrupted(signum)
        if not self.defer(exc):
            raise exc
