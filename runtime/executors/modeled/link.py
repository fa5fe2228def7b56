"""The modeled host-to-device link: copies on a timeline in the same virtual clock as compute.

A copy from the disk tier takes the disk's read time as well (the cost model's ``disk_bw``,
``disk_latency``); the disk tier itself is virtual there (nothing is written).

:class:`VirtualClock` is the modeled time of a run (and how much of it was compute or stall).
:class:`ModeledCopyEngine` runs the memory manager's transfers one at a time on that clock, at the
cost model's copy speed: transfers proceed while steps compute, as on a copy stream, and a
request whose object is still on the link waits (a *stall*, the clock jumps to the copy's end).
An urgent load preempts a running prefetch unless ``preempt=False``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from runtime.cost_model import CostModel
from runtime.memory import Transfer


class _VirtualDone:
    """Stands in for a transfer's ``threading.Event``: waiting advances the virtual clock."""

    def __init__(self, engine: "ModeledCopyEngine", transfer: Transfer) -> None:
        self.engine, self.transfer, self.flag = engine, transfer, False

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float | None = None) -> bool:
        if not self.flag:
            self.engine.wait_for(self.transfer)
        return True


@dataclass
class VirtualClock:
    """Modeled seconds since the start; :attr:`stall` is the part spent waiting on the link."""

    now: float = 0.0
    stall: float = 0.0
    compute: float = 0.0


class ModeledCopyEngine:
    """One host-to-device link in virtual time: a :class:`~runtime.memory.CopyLink`.

    Jobs run one at a time in priority order (urgent first, then nearest distance, then arrival).
    :meth:`advance` moves the link up to the clock; :meth:`wait_for` moves the clock (a stall)
    until a job is done.
    """

    def __init__(self, clock: VirtualClock, cost: CostModel, *, preempt: bool = True) -> None:
        self.clock, self.cost, self.preempt = clock, cost, preempt
        self._queue: list[tuple[bool, float, int, Transfer]] = []
        self._order = 0
        self.current: Transfer | None = None
        self._end = 0.0          # when the current job finishes
        self._free_at = 0.0      # when the link became (or becomes) idle
        self.busy_s = 0.0

    def now(self) -> float:
        return self.clock.now

    def submit(self, transfer: Transfer) -> Transfer:
        self.advance(self.clock.now)
        transfer.done = _VirtualDone(self, transfer)
        self._order += 1
        transfer.order = self._order
        heapq.heappush(self._queue, (not transfer.urgent, transfer.distance, self._order, transfer))
        if transfer.urgent:
            self._preempt_current()
        self._start_next()
        return transfer

    def promote(self, transfer: Transfer) -> None:
        if transfer.urgent or transfer.done.is_set():
            return
        self.advance(self.clock.now)
        transfer.urgent = True
        if transfer is self.current:
            return
        self._queue = [e for e in self._queue if e[3] is not transfer]
        heapq.heapify(self._queue)
        heapq.heappush(self._queue, (False, 0.0, transfer.order, transfer))
        self._preempt_current()
        self._start_next()

    def cancel(self, transfer: Transfer) -> None:
        if transfer.done.is_set():
            return
        if transfer is self.current:
            self._abort_current()
        else:
            self._queue = [e for e in self._queue if e[3] is not transfer]
            heapq.heapify(self._queue)
            transfer.aborted = True
            transfer.done.set()
        self._start_next()

    def close(self) -> None:
        pass

    # -- the timeline -------------------------------------------------------------------------

    def _preempt_current(self) -> None:
        if self.preempt and self.current is not None and not self.current.urgent:
            self._abort_current()

    def _abort_current(self) -> None:
        job, self.current = self.current, None
        assert job is not None
        done_s = self.clock.now - job.started_at
        self.busy_s += done_s
        self._free_at = self.clock.now
        job.aborted = True
        job.done.set()

    def _start_next(self) -> None:
        if self.current is None and self._queue:
            job = heapq.heappop(self._queue)[3]
            start = max(self._free_at, self.clock.now)
            job.started = True
            job.started_at = start
            job.seconds = self.cost.copy_seconds(job.obj.nbytes, job.source)
            self.current, self._end = job, start + job.seconds

    def advance(self, until: float) -> None:
        """Finish every job that the link completes by ``until``."""
        while self.current is not None and self._end <= until:
            job, self.current = self.current, None
            self.busy_s += job.seconds
            self._free_at = self._end
            job.result = {}
            job.done.set()
            if self._queue:
                job = heapq.heappop(self._queue)[3]
                job.started = True
                job.started_at = self._free_at
                job.seconds = self.cost.copy_seconds(job.obj.nbytes, job.source)
                self.current, self._end = job, self._free_at + job.seconds

    def wait_for(self, transfer: Transfer) -> None:
        """Stall the clock until ``transfer`` is done (it must be queued or running)."""
        while not transfer.done.is_set():
            if self.current is None:
                self._start_next()
                if self.current is None:
                    raise RuntimeError(f"waiting on {transfer!r}, which is not on the link")
            if self._end > self.clock.now:
                self.clock.stall += self._end - self.clock.now
                self.clock.now = self._end
            self.advance(self.clock.now)
