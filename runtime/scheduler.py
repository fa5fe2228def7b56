"""Which sequences run in the next engine iteration.

:class:`Scheduler` serves executors that finish a request in one call (``hf``);
:class:`BatchScheduler` drives the paged ``torch`` executor token by token.

Sequences wait in arrival order and are admitted into the running set while it has room
(``max_num_seqs``). The engine removes finished sequences after each iteration, so requests that
arrive while others are decoding join the running batch at the next step (continuous batching).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from runtime.kv_cache import KVCache, OutOfBlocks
from runtime.prefix_cache import PrefixCache
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


class BatchScheduler:
    """Token-budgeted continuous batching over the paged KV pool.

    Each iteration spends at most ``max_batch_tokens`` tokens: first one token for every running
    sequence that is decoding, then prefill chunks of running sequences, then newly admitted
    waiting sequences (at most ``max_num_seqs`` run at once). A sequence from a new agent call
    first looks up its agent's cached prefix KV and, on a hit, starts after it.

    When the pool lacks blocks, cached prefix entries are let go first through :attr:`reclaim`
    (without a memory manager the prefix cache's own LRU, :meth:`PrefixCache.evict_one`; with one,
    the manager evicts in its policy's order, so there is one eviction mechanism); if that is not
    enough, the most recently admitted running sequence is preempted: its blocks are freed and it
    waits at the head of the queue to be recomputed. A waiting sequence that does not fit yet
    simply waits; the engine rejects at submission any request that could never fit.

    :attr:`admit`, when set (by :meth:`Engine.attach_memory`), is called before a waiting
    sequence looks up its prefix: it pins the sequence's memory objects (loading or marking for
    recompute what is missing) and returns ``False`` when they cannot be placed yet (the sequence
    keeps waiting). A sequence it fails is set aside and returned by :meth:`remove_finished`.
    """

    def __init__(self, cache: KVCache, prefixes: PrefixCache, max_num_seqs: int = 64,
                 max_batch_tokens: int = 512) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.cache, self.prefixes = cache, prefixes
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.admit: Callable[[Sequence], bool] | None = None
        #: frees KV blocks held by cached prefixes; ``blocks`` is how many are still missing
        self.reclaim: Callable[[int], bool] = lambda blocks: prefixes.evict_one()
        self._failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Pick this iteration's sequences and set each one's ``chunk`` (tokens to compute)."""
        budget = self.max_batch_tokens
        batch: list[Sequence] = []
        # Decodes (one token left to compute) before prefill chunks; sorted() keeps admission order.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n, batch):
                continue
            seq.chunk = n
            budget -= n
            batch.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table:
                if self.admit is not None and not self.admit(seq):
                    if seq.status is SequenceStatus.FINISHED:  # failed: its objects never fit
                        self._failed.append(self.waiting.popleft())
                        continue
                    break
                self._attach_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.chunk = n
            budget -= n
            batch.append(seq)
        return batch

    def _attach_prefix(self, seq: Sequence) -> None:
        if not seq.prefix_ids:
            return
        adapter = seq.request.adapter
        entry = self.prefixes.lookup(seq.request.agent_id, adapter, seq.prefix_ids)
        # Until a prefix was reused (cached_tokens), a failed attach is a miss: it overrules a
        # memory manager's hit (set at admission) on an entry still waiting to be recomputed.
        first = seq.cached_tokens == 0
        if entry is not None:
            try:
                seq.block_table = self.prefixes.attach(entry)
            except OutOfBlocks:
                entry = None
        if entry is None:
            if first:
                seq.memory.hits.pop("prefix_kv", None)
                seq.memory.misses["prefix_kv"] = 1
            return
        # Keep at least one token to compute: its logits give the first output token.
        seq.num_computed = min(entry.num_tokens, seq.num_tokens - 1)
        seq.prefix_cached = True
        if first:
            seq.cached_tokens = seq.num_computed
            if "prefix_kv" not in seq.memory.misses:  # a manager's load from a copy stays a miss
                seq.memory.hits["prefix_kv"] = 1

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` tokens, dropping cached prefixes if needed."""
        need = self.cache.blocks_for(num_tokens) - len(seq.block_table)
        while need > self.cache.num_free:
            if not self.reclaim(need - self.cache.num_free):
                return False
        if need > 0:
            seq.block_table += self.cache.allocate(need)
        return True

    def _reserve(self, seq: Sequence, num_tokens: int, batch: list[Sequence]) -> bool:
        """Like :meth:`_grow` for a running sequence, preempting others (or itself) if needed."""
        while not self._grow(seq, num_tokens):
            victims = [s for s in self.running if s is not seq and s not in batch]
            self.preempt(victims[-1] if victims else seq)
            if not victims:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it to be recomputed first."""
        self.cache.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.prefix_cached = False
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.status is SequenceStatus.FINISHED]
        if done:
            self.running = [s for s in self.running if s.status is not SequenceStatus.FINISHED]
            for seq in done:
                self.cache.release(seq.block_table)
                seq.block_table = []
        if self._failed:
            done += self._failed
            self._failed = []
        return done
