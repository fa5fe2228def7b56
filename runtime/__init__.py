"""The ScaleSim serving runtime.

An in-process LLM engine that a discrete-event simulation drives: requests are submitted as agents
ask, :meth:`Engine.step` runs one iteration, and finished requests come back as
:class:`Completion` objects. This package never imports :mod:`scalesim`; the simulation talks to
it only through :class:`Request`, :class:`Completion` and the :class:`Engine` methods.
"""

from runtime.request import Completion, MemoryStats, Request, RequestError, SamplingParams
from runtime.constrained import Constraint, ConstraintError
from runtime.engine import Engine, build_engine

__all__ = [
    "Completion",
    "Constraint",
    "ConstraintError",
    "Engine",
    "MemoryStats",
    "Request",
    "RequestError",
    "SamplingParams",
    "build_engine",
]
