"""The server's distance source when it learns from the stream: a client's hints where it sent
them, the stream estimator's predictions everywhere else.

:class:`HintsOrEstimate` is a :class:`~scalesim.serve.hints.HintedDistance` (it takes hints the
same way, from the same endpoints) that also feeds every arrival and finish to a
:class:`~scalesim.serve.stream_estimator.StreamEstimator`. For each agent the hint wins while
it lives; an agent without one is ordered by the estimate. Both keys are times on the server's
clock, so hinted and estimated agents interleave in one order. A session that hints every agent
therefore sees exactly what it would see without the estimator, and one that hints none is
served by the estimator alone.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Callable

from scalesim.serve.hints import UNKNOWN, HintedDistance
from scalesim.serve.stream_estimator import StreamEstimator


class HintsOrEstimate(HintedDistance):
    """Hints first, stream estimates elsewhere (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] | None = None,
                 estimator: StreamEstimator | None = None) -> None:
        super().__init__(clock)
        self.estimator = estimator or StreamEstimator(self._now)
        self.estimator.watch(self._estimate_changed)

    def _estimate_changed(self, agent: str) -> None:
        if agent not in self._hinted:  # a hinted agent's key is its hint's
            self._changed(agent)

    # -- what the engine loop reports ---------------------------------------------------------

    def on_submit(self, agent_id: str) -> None:
        self.estimator.on_submit(agent_id)
        super().on_submit(agent_id)

    def on_finish(self, agent_id: str) -> None:
        self.estimator.on_finish(agent_id)
        super().on_finish(agent_id)

    def expire(self) -> int:
        self.estimator.expire()
        return super().expire()

    # -- predictions: the hint, else the estimate ---------------------------------------------

    def _predicted_key(self, agent_id: str) -> float:
        key = self._hinted.get(agent_id)
        return self.estimator.order_key(agent_id) if key is None else self._hint_key(key)

    def _hint_key(self, t: float) -> float:
        """A hint's server time as an arrival index (``never`` stays last)."""
        return t if math.isinf(t) else self.estimator.arrival_at(t)

    def _predicted_distance(self, agent_id: str) -> float:
        if agent_id in self._hinted:
            return super()._predicted_distance(agent_id)
        return self.estimator.distance(agent_id)

    def _nearest_predicted(self, k: int) -> list[str]:
        hinted = super()._nearest_predicted(k)
        # Estimated agents that a hint overrides are skipped: ask for enough to fill k.
        estimated = (a for a in self.estimator._nearest_predicted(k + len(self._hinted))
                     if a not in self._hinted and a not in self._pending)
        merged = heapq.merge(((self._hint_key(self._hinted[a]), a) for a in hinted),
                             ((self.estimator.order_key(a), a) for a in estimated))
        return [a for key, a in itertools.islice(merged, k) if key < UNKNOWN]
