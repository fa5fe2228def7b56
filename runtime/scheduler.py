"""Which sequences run in the next engine iteration.

Sequences wait in arrival order and are admitted into the running set while it has room
(``max_num_seqs``). The engine removes finished sequences after each iteration, so requests that
arrive while others are decoding join the running batch at the next step (continuous batching).
"""

from __future__ import annotations

from collections import deque

from runtime.sequence import Sequence, SequenceStatus


class Scheduler:
    """First-come first-served admission into a bounded running set."""

    def __init__(self, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Admit waiting sequences while there is room; return the batch to run."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return list(self.running)

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.status is SequenceStatus.FINISHED]
        if done:
            self.running = [s for s in self.running if s.status is not SequenceStatus.FINISHED]
        return done
