"""Where in a world's own code an exception came from.

An exception that stops a run usually starts in the world's code (a typo in ``run()``, a bad
parameter in ``setup()``) but surfaces through the library's clock loop and simpy. What its
author needs first is the line of their file: :func:`world_frame` finds the innermost frame of
the traceback that is neither the library's (``scalesim``, ``runtime``, ``agents``) nor a
dependency's or Python's own, and :func:`describe` puts it in the one line the command line
prints, e.g. ``worlds/market.py:88 in run (price = book["knd"]): KeyError: 'knd'``.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
#: the library's own packages: frames in them are not the world's
_LIBRARY = tuple(str(_ROOT / name) + os.sep for name in ("scalesim", "runtime", "agents"))
#: Python's and the installed packages' directories
_ELSEWHERE = tuple({p for key in ("stdlib", "platstdlib", "purelib", "platlib")
                    if (p := sysconfig.get_paths().get(key))} | {sys.prefix, sys.base_prefix})


@dataclass(frozen=True)
class WorldFrame:
    """One frame of a world's code: file, line number, function and the line's text."""

    filename: str
    lineno: int
    function: str
    line: str

    def where(self) -> str:
        """``file:line in function`` with the file relative to the working directory when
        it lies below it."""
        path = Path(self.filename)
        try:
            shown = str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = self.filename
        return f"{shown}:{self.lineno} in {self.function}"


def _is_world(filename: str) -> bool:
    path = str(Path(filename).resolve())
    if filename.startswith("<") or path.startswith(_LIBRARY):
        return False
    return not any(path.startswith(str(Path(p).resolve())) for p in _ELSEWHERE)


def world_frame(exc: BaseException) -> WorldFrame | None:
    """The innermost frame in a world's code of ``exc``'s traceback, or of the exception it
    was raised from where that one started deeper (simpy re-raises a process's exception as a
    copy whose ``__cause__`` holds the original traceback)."""
    found = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            if _is_world(frame.filename):
                line = frame.line or linecache.getline(frame.filename, frame.lineno or 0)
                found = WorldFrame(frame.filename, frame.lineno or 0, frame.name, line.strip())
        current = current.__cause__
    return found


def describe(exc: BaseException) -> str:
    """``exc`` in one line, led by the world's frame where there is one."""
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    frame = world_frame(exc)
    if frame is None:
        return message
    return f"{frame.where()} ({frame.line}): {message}" if frame.line else \
        f"{frame.where()}: {message}"
