"""How full the engine's batches are, as the simulation sees them.

An accelerator decodes one sequence in about the time it decodes thirty-two, so what a run makes
of it is its *occupancy*: the sequences (and tokens) per model step. Calls that take simulated
time let the engine wait until it must answer them, so that the calls of many instants share its
batches (:mod:`scalesim.environment`); :class:`EngineOccupancy` measures what that bought. It
sums every engine iteration's :class:`~runtime.interface.StepResult` (a decode run counts as
the steps it stood for) and the calls in flight over simulated time, whose time average is, by
Little's law, the call rate times the mean duration: the number the duration of a world is
chosen by. It is the ``occupancy`` section of ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.interface import StepResult


@dataclass
class EngineOccupancy:
    """Totals of a run's engine iterations and of its calls in flight (see the module doc)."""

    #: engine iterations, and the model steps they stood for
    iterations: int = 0
    steps: int = 0
    #: sequences summed over the steps (a decode run of ``n`` steps counts its batch ``n`` times)
    sequence_steps: int = 0
    #: tokens the steps computed
    tokens: int = 0
    #: calls in flight integrated over simulated time, and the simulated time covered
    in_flight_time: float = 0.0
    span: float = 0.0

    def record_step(self, step: StepResult) -> None:
        """Count one engine iteration."""
        self.iterations += 1
        self.steps += step.steps
        self.sequence_steps += step.batch * step.steps
        self.tokens += step.tokens

    def record_clock(self, in_flight: int, elapsed: float) -> None:
        """The clock moved ``elapsed`` with ``in_flight`` calls not yet returned."""
        self.in_flight_time += in_flight * elapsed
        self.span += elapsed

    @property
    def sequences_per_step(self) -> float:
        return self.sequence_steps / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def mean_in_flight(self) -> float:
        """Calls in flight on average over simulated time (0 when every call takes none)."""
        return self.in_flight_time / self.span if self.span else 0.0

    def summary(self) -> dict[str, Any]:
        """The ``occupancy`` section of ``summary.json``."""
        return {"iterations": self.iterations, "steps": self.steps,
                "sequences_per_step": round(self.sequences_per_step, 3),
                "tokens_per_step": round(self.tokens_per_step, 3),
                "mean_calls_in_flight": round(self.mean_in_flight, 3)}
