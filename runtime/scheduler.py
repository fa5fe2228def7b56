"""Which sequences run in the next engine iteration.

:class:`Scheduler` serves executors that finish a request in one call (``hf``);
:class:`BatchScheduler` drives the paged ``torch`` executor token by token, and the ``modeled``
one with the same code.

Sequences wait in the order of their due time (:attr:`runtime.request.Request.due`), first come
first served among equal ones, and requests without a due time after every dated one: a
simulation whose calls all return at once (duration 0) or a server gets plain arrival order.
They are admitted into the running set while it has room (``max_num_seqs``). Before a sequence
is admitted, the :class:`Admission` it was built with pins its memory objects (loading what is
missing); one whose objects cannot be placed yet keeps waiting, and so does everyone behind it.
The engine removes finished sequences after each iteration, so requests that arrive while others
are decoding join the running batch at the next step (continuous batching).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Callable, Protocol

from runtime.kv_cache import KVCache, OutOfBlocks
from runtime.prefix_cache import PrefixTree
from runtime.sequence import Batch, Sequence, SequenceStatus


class Admission(Protocol):
    """What a scheduler asks before a waiting sequence runs (:class:`runtime.admission`)."""

    def admit(self, seq: Sequence) -> bool:
        """Pin ``seq``'s memory objects; ``False`` if they cannot be placed now or never (then
        ``seq`` has failed)."""

    def withdraw(self, seq: Sequence) -> None:
        """Unpin the objects of an admitted ``seq`` that goes back to waiting unstarted."""


def due(seq: Sequence) -> float:
    """When ``seq``'s reply is due: its request's due time, ``inf`` when it has none."""
    request_due = seq.request.due
    return math.inf if request_due is None else request_due


class Scheduler:
    """Earliest-due-first admission into a bounded running set (first come, first served among
    equal due times)."""

    def __init__(self, max_num_seqs: int, admission: Admission) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.max_num_seqs = max_num_seqs
        self.admission = admission
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` behind every waiting sequence due no later than it."""
        waiting = self.waiting
        if not waiting or due(waiting[-1]) <= due(seq):
            waiting.append(seq)  # the common case: calls arrive in due order
        else:
            waiting.insert(bisect.bisect_right(waiting, due(seq), key=due), seq)

    def requeue(self, seq: Sequence) -> None:
        """Queue ``seq`` (preempted) ahead of every waiting sequence due no earlier than it."""
        self.waiting.insert(bisect.bisect_left(self.waiting, due(seq), key=due), seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._failed)

    def cancel(self, request_id: int, reason: str) -> bool:
        """Fail the waiting or running sequence ``request_id`` now; ``False`` if there is none.

        It leaves at the next :meth:`remove_finished`, which frees what it holds, like any
        finished sequence.
        """
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._failed.append(seq)
                self._release_blocks(seq)
                seq.fail(reason)
                return True
        for seq in self.running:
            if seq.request_id == request_id and seq.status is not SequenceStatus.FINISHED:
                seq.fail(reason)
                return True
        return False

    def _release_blocks(self, seq: Sequence) -> None:
        """Free the KV blocks of a sequence leaving the waiting queue (none here)."""

    def schedule(self) -> Batch:
        """Admit waiting sequences while there is room; return the batch to run."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.admission.admit(seq):
                if seq.status is SequenceStatus.FINISHED:  # failed: its objects never fit
                    self._failed.append(self.waiting.popleft())
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return Batch([s for s in self.running if s.status is not SequenceStatus.FINISHED])

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.status is SequenceStatus.FINISHED]
        if done:
            self.running = [s for s in self.running if s.status is not SequenceStatus.FINISHED]
        done += self._failed
        self._failed = []
        return done


class BatchScheduler(Scheduler):
    """Token-budgeted continuous batching over the paged KV pool.

    Each iteration spends at most ``max_batch_tokens`` tokens: first one token for every running
    sequence that is decoding, then prefill chunks of running sequences, then newly admitted
    waiting sequences (at most ``max_num_seqs`` run at once). A sequence from a new agent call
    is admitted (its memory pinned, the cached segments of its prefix among it) and then starts
    after the longest prefix of its tokens cached in ``prefixes`` (the
    :class:`~runtime.prefix_cache.PrefixTree` of the pool). What a sequence computes goes into
    the tree once its prompt is computed, and again when it finishes.

    When the pool lacks blocks, ``reclaim(blocks)`` is asked to let cached segments go (the
    memory manager evicts in its policy's order); if that is not enough, the running sequence
    due last (the most recently admitted among equals) is preempted: its blocks are freed and it
    waits ahead of the sequences due no earlier than it, to be recomputed. A waiting sequence that does not fit yet simply waits; the
    engine rejects at submission any request that could never fit.

    ``shared_prefill`` (0: no limit of its own) caps the prompt tokens one sequence computes in
    an iteration that others need: a running prompt's chunk while sequences decode or wait, a
    newly admitted one's while sequences decode. An iteration's time grows with its tokens: a
    long prompt taking every iteration's whole budget keeps newly arrived requests out until it
    is done, and a short reply decoding beside its chunks waits a chunk per token. With a cap,
    new requests get in at once and decode in quick iterations, while the long prompt still
    advances every iteration (Sarathi-Serve's stall-free batching).

    ``decode_horizon(seq)``, when given, says how many more tokens ``seq`` will certainly decode
    without the engine needing to look (1: it must look after every token). When every running
    sequence is decoding and nobody waits to join, the scheduler then returns a decode run of
    that many steps (:class:`~runtime.sequence.Batch`) and allocates its blocks up front.
    """

    def __init__(self, cache: KVCache, max_num_seqs: int, max_batch_tokens: int,
                 admission: Admission, *, prefixes: PrefixTree | None = None,
                 reclaim: Callable[[int], bool] | None = None,
                 decode_horizon: Callable[[Sequence], int] | None = None,
                 shared_prefill: int = 0) -> None:
        super().__init__(max_num_seqs, admission)
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if shared_prefill < 0:
            raise ValueError(f"shared_prefill must be >= 0, got {shared_prefill}")
        self.shared_prefill = shared_prefill
        self.cache, self.prefixes = cache, prefixes
        self.max_batch_tokens = max_batch_tokens
        self.num_preemptions = 0
        self._reclaim = reclaim
        self._decode_horizon = decode_horizon

    def schedule(self) -> Batch:
        """Pick this iteration's sequences and set each one's ``chunk`` (tokens to compute)."""
        budget = self.max_batch_tokens
        batch: list[Sequence] = []
        decoding = False
        # Decodes (one token left to compute) before prefill chunks; sorted() keeps admission order.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            left = seq.num_tokens - seq.num_computed
            decoding = decoding or left == 1
            n = min(left, budget)
            if left > 1 and (decoding or self.waiting):
                n = self._shared(n)
            if not self._reserve(seq, seq.num_computed + n, batch):
                continue
            seq.chunk = n
            budget -= n
            batch.append(seq)
        computing = self._computing() if self.prefixes is not None and self.waiting else set()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table:
                if computing and self._next_block_in(seq, computing):
                    deferred.append(self.waiting.popleft())  # see _computing
                    continue
                if not self.admission.admit(seq):
                    if seq.status is SequenceStatus.FINISHED:  # failed: its objects never fit
                        self._failed.append(self.waiting.popleft())
                        continue
                    break
                self._attach_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if decoding:
                n = self._shared(n)
            if not self._grow(seq, seq.num_computed + n):
                self._withdraw(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.chunk = n
            budget -= n
            batch.append(seq)
            if self.prefixes is not None and not seq.prompt_cached:
                computing.update(self.prefixes.chain(seq))
        self.waiting.extendleft(reversed(deferred))
        return Batch(batch, self._decode_run(batch))

    def _shared(self, chunk: int) -> int:
        """``chunk`` prompt tokens, capped in an iteration others need (``shared_prefill``)."""
        cap = self.shared_prefill
        return min(chunk, cap) if cap else chunk

    def _computing(self) -> set[int]:
        """The block chains (:meth:`~runtime.prefix_cache.PrefixTree.chain`) of the prompts
        running sequences are computing and have not cached yet.

        A waiting sequence whose next uncached block is among them waits for them (its place in
        the queue kept): once their prompt is computed and cached, it reuses it, instead of
        computing the same blocks alongside (many agents that share a preamble and call at the
        same instant compute it once).
        """
        assert self.prefixes is not None
        computing: set[int] = set()
        for seq in self.running:
            if seq.status is SequenceStatus.RUNNING and not seq.prompt_cached:
                computing.update(self.prefixes.chain(seq))
        return computing

    def _next_block_in(self, seq: Sequence, computing: set[int]) -> bool:
        """Whether the first block of ``seq`` the cache lacks is being computed by another."""
        assert self.prefixes is not None
        chain = self.prefixes.chain(seq)
        cached = self.prefixes.cached_blocks(seq)
        return cached < len(chain) and chain[cached] in computing

    def _attach_prefix(self, seq: Sequence) -> None:
        """Start a newly admitted ``seq`` after the longest cached prefix of its tokens."""
        if self.prefixes is None:
            return
        self.prefixes.attach(seq)
        reused = len(seq.block_table) * self.cache.block_size
        persona = len(seq.prefix_ids) // self.cache.block_size * self.cache.block_size
        acquired = any(o.kind == "prefix_kv" for o in seq.memory_objects)
        if seq.prefix_hit is None and (reused or persona or acquired):
            # The first lookup decides the call's hit (all of the persona's full blocks reused)
            # or miss; a call with nothing cacheable before its prompt has neither.
            seq.prefix_hit = reused > 0 and reused >= persona
        seq.num_computed = reused
        if seq.cached_tokens == 0:
            seq.cached_tokens = reused

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` tokens, dropping cached prefixes if needed."""
        need = self.cache.blocks_for(num_tokens) - len(seq.block_table)
        while need > self.cache.num_free:
            if self._reclaim is None or not self._reclaim(need - self.cache.num_free):
                return False
        if need > 0:
            seq.block_table += self.cache.allocate(need)
        return True

    def _reserve(self, seq: Sequence, num_tokens: int, batch: list[Sequence]) -> bool:
        """Like :meth:`_grow` for a running sequence, preempting others (or itself) if needed."""
        while not self._grow(seq, num_tokens):
            victims = [s for s in self.running if s is not seq and s not in batch]
            # max() keeps the first of equals: reversed, that is the most recently admitted.
            self.preempt(max(reversed(victims), key=due) if victims else seq)
            if not victims:
                return False
        return True

    def _decode_run(self, batch: list[Sequence]) -> int:
        """How many decode steps ``batch`` takes at once (1: an ordinary iteration)."""
        if (self._decode_horizon is None or not batch or len(batch) != len(self.running)
                or (self.waiting and len(self.running) < self.max_num_seqs)):
            return 1  # someone else would join the next step
        steps: float = math.inf
        for seq in batch:
            if seq.chunk != 1 or seq.num_computed + 1 != seq.num_tokens:
                return 1
            steps = min(steps, self._decode_horizon(seq))
        if steps <= 1:
            return 1
        n = int(steps)
        need = [self.cache.blocks_for(seq.num_tokens + n - 1) - len(seq.block_table)
                for seq in batch]
        if sum(need) > self.cache.num_free:
            return 1  # the pool would run short in between: step one by one (and preempt)
        for seq, blocks in zip(batch, need):
            if blocks > 0:
                seq.block_table += self.cache.allocate(blocks)
        return n

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it to be recomputed first among its due time."""
        self.cache.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.requeue(seq)
        self.num_preemptions += 1

    def _withdraw(self, seq: Sequence) -> None:
        """``seq`` cannot start for want of blocks: it lets go of what it was given (its reused
        blocks, its pinned objects), so that waiting sequences never hold the pool between
        them while nothing runs; it is admitted afresh when it gets its turn."""
        self._release_blocks(seq)
        seq.num_computed = 0
        self.admission.withdraw(seq)

    def _cache_computed(self) -> None:
        """Insert into the prefix cache what running sequences computed: a prompt once it is
        computed, everything when the sequence finishes."""
        assert self.prefixes is not None
        for seq in self.running:
            finished = seq.status is SequenceStatus.FINISHED
            if finished or (not seq.prompt_cached and seq.num_computed >= seq.num_prompt_tokens):
                seq.prompt_cached = True
                if seq.block_table:
                    self.prefixes.insert(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        """A waiting sequence may hold blocks (an attached prefix, or a failed grow): free them."""
        if seq.block_table:
            self.cache.release(seq.block_table)
            seq.block_table = []

    def remove_finished(self) -> list[Sequence]:
        if self.prefixes is not None:
            self._cache_computed()
        done = [s for s in self.running if s.status is SequenceStatus.FINISHED]
        if done:
            self.running = [s for s in self.running if s.status is not SequenceStatus.FINISHED]
            for seq in done:
                self.cache.release(seq.block_table)
                seq.block_table = []
        done += self._failed
        self._failed = []
        return done
