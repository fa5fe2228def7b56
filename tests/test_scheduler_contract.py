"""The schedulers' contract, checked without a model.

:class:`~runtime.scheduler.Scheduler` and :class:`~runtime.scheduler.BatchScheduler` are driven
here by a small loop that plays the engine, a scripted admission and a fake executor on the real
KV block manager (:class:`~runtime.kv_cache.KVCache`, one tiny layer). The fake executor writes
every token it computes into the sequence's KV slot and, before computing, reads back every slot
the sequence says is computed: a block lost, shared by mistake or not recomputed after a
preemption shows up as a wrong value. Its next token is a function of all the tokens before it,
so a sequence that was preempted and recomputed must end with the output it would have had
without the preemption.

The contract: earliest-due-first admission, first come, first served among equal due times and
for requests without one (a refused sequence holds up everyone behind it, and is asked again
later); at most ``max_batch_tokens`` tokens and ``max_num_seqs`` sequences per iteration,
decodes first; a pool that runs short first asks ``reclaim`` and then preempts the running
sequence due last (the most recently admitted among equals), which waits ahead of everyone due
no earlier and recomputes; decode runs only when nothing could join in between.
"""

from __future__ import annotations

from typing import Callable

import pytest

from runtime.kv_cache import KVCache
from runtime.request import Request, SamplingParams
from runtime.scheduler import BatchScheduler, Scheduler
from runtime.sequence import Batch, Sequence, SequenceStatus


def next_token(tokens: list[int]) -> int:
    """The fake model: a token that depends on every token before it (never 0)."""
    return 1 + (sum(t * (i + 1) for i, t in enumerate(tokens)) % 97)


def expected_output(seq: Sequence) -> list[int]:
    """What ``seq`` must answer, computed without any scheduler."""
    tokens = list(seq.input_ids)
    for _ in range(seq.request.sampling.max_tokens):
        tokens.append(next_token(tokens))
    return tokens[seq.num_prompt_tokens:]


def make_seq(request_id: int, prompt_tokens: int, max_tokens: int = 4,
             due: float | None = None) -> Sequence:
    request = Request(f"agent{request_id}", "-", request_id=request_id,
                      sampling=SamplingParams(max_tokens=max_tokens), due=due)
    return Sequence(request, [], [10 + request_id + i for i in range(prompt_tokens)])


def tiny_pool(num_blocks: int, block_size: int = 4) -> KVCache:
    """The real block manager over a pool of one layer, one head, one float per token."""
    return KVCache(1, num_blocks, block_size, 1, 1)


class ScriptedAdmission:
    """Admits every sequence, except ``refuse[id]`` times for a refused one; ``never`` fails.

    ``asked`` lists the request ids in the order the scheduler asked about them.
    """

    def __init__(self, refuse: dict[int, int] | None = None, never: tuple[int, ...] = ()) -> None:
        self.refuse = dict(refuse or {})
        self.never = set(never)
        self.asked: list[int] = []
        self.withdrawn: list[int] = []

    def admit(self, seq: Sequence) -> bool:
        self.asked.append(seq.request_id)
        if seq.request_id in self.never:
            seq.fail("its memory objects never fit")
            return False
        if self.refuse.get(seq.request_id, 0) > 0:
            self.refuse[seq.request_id] -= 1
            return False
        return True

    def withdraw(self, seq: Sequence) -> None:
        self.withdrawn.append(seq.request_id)


class TapeExecutor:
    """Computes each sequence's ``chunk`` into its KV blocks; samples once all is computed.

    ``batches`` records every batch as ``(steps, [(request id, first position, chunk), ...])``.
    """

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.batches: list[tuple[int, list[tuple[int, int, int]]]] = []

    def _slot(self, seq: Sequence, position: int) -> tuple[int, int]:
        size = self.cache.block_size
        return seq.block_table[position // size], position % size

    def execute(self, batch: Batch) -> None:
        self.batches.append((batch.steps, [(s.request_id, s.num_computed, s.chunk)
                                           for s in batch]))
        for seq in batch:
            n = seq.chunk
            for _ in range(batch.steps):
                tokens = seq.all_token_ids
                for p in range(seq.num_computed):  # what is computed is still there
                    block, offset = self._slot(seq, p)
                    assert self.cache.k[0, block, offset, 0, 0].item() == tokens[p], (
                        f"request {seq.request_id}: KV of position {p} lost")
                for p in range(seq.num_computed, seq.num_computed + n):
                    block, offset = self._slot(seq, p)
                    self.cache.k[0, block, offset, 0, 0] = tokens[p]
                seq.num_computed += n
                if seq.num_computed == seq.num_tokens:
                    seq.append_tokens([next_token(tokens)])
                n = 1
            seq.chunk = 0


class Loop:
    """Plays the engine: schedule, execute, finish at ``max_tokens``, remove the finished."""

    def __init__(self, scheduler: Scheduler, executor: TapeExecutor | None = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.finished: list[Sequence] = []
        #: request ids in the order they first ran
        self.started: list[int] = []

    def step(self) -> Batch:
        batch = self.scheduler.schedule()
        for seq in batch:
            if seq.request_id not in self.started:
                self.started.append(seq.request_id)
        if batch and self.executor is not None:
            self.executor.execute(batch)
        for seq in batch:
            if len(seq.output_ids) >= seq.request.sampling.max_tokens:
                seq.finish_reason = "length"
                seq.status = SequenceStatus.FINISHED
        self.finished += self.scheduler.remove_finished()
        return batch

    def run(self, limit: int = 500) -> list[Sequence]:
        for _ in range(limit):
            if not self.scheduler.has_work():
                return self.finished
            self.step()
        raise AssertionError(f"still busy after {limit} iterations")


def batch_scheduler(cache: KVCache, admission: ScriptedAdmission, *, max_num_seqs: int = 8,
                    max_batch_tokens: int = 64,
                    reclaim: Callable[[int], bool] | None = None,
                    decode_horizon: Callable[[Sequence], int] | None = None) -> BatchScheduler:
    return BatchScheduler(cache, max_num_seqs, max_batch_tokens, admission, reclaim=reclaim,
                          decode_horizon=decode_horizon)


def assert_all_correct(seqs: list[Sequence], cache: KVCache) -> None:
    for seq in seqs:
        assert seq.error is None, seq.error
        assert seq.output_ids == expected_output(seq), f"request {seq.request_id}"
    assert cache.num_free == cache.num_blocks  # every block came back


# -- Scheduler (one call per request) ----------------------------------------------------------

def test_scheduler_admits_first_come_first_served_up_to_max_num_seqs():
    admission = ScriptedAdmission()
    scheduler = Scheduler(2, admission)
    seqs = [make_seq(i, 3) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.schedule()] == [0, 1]
    assert admission.asked == [0, 1]  # nobody behind is asked while the running set is full
    seqs[1].status = SequenceStatus.FINISHED
    assert scheduler.remove_finished() == [seqs[1]]
    assert [s.request_id for s in scheduler.schedule()] == [0, 2]
    assert [s.request_id for s in scheduler.waiting] == [3]


def test_scheduler_refused_admission_holds_up_the_queue_and_is_retried():
    admission = ScriptedAdmission(refuse={0: 2})
    scheduler = Scheduler(4, admission)
    for i in range(3):
        scheduler.add(make_seq(i, 3))
    assert not scheduler.schedule() and not scheduler.schedule()
    assert admission.asked == [0, 0]  # no one overtakes the refused head
    assert [s.request_id for s in scheduler.schedule()] == [0, 1, 2]
    assert admission.asked == [0, 0, 0, 1, 2]


def test_scheduler_a_sequence_that_can_never_be_admitted_fails_alone():
    scheduler = Scheduler(4, ScriptedAdmission(never=(1,)))
    for i in range(3):
        scheduler.add(make_seq(i, 3))
    assert [s.request_id for s in scheduler.schedule()] == [0, 2]
    failed = scheduler.remove_finished()
    assert [s.request_id for s in failed] == [1] and failed[0].error


def test_scheduler_cancel_fails_a_waiting_sequence_at_the_next_removal():
    scheduler = Scheduler(1, ScriptedAdmission())
    for i in range(3):
        scheduler.add(make_seq(i, 3))
    scheduler.schedule()
    assert scheduler.cancel(2, "client went away") and not scheduler.cancel(7, "no such")
    [gone] = scheduler.remove_finished()
    assert gone.request_id == 2 and gone.error == "client went away"
    assert [s.request_id for s in scheduler.waiting] == [1]


# -- BatchScheduler (token by token, paged KV) -------------------------------------------------

def test_batch_scheduler_runs_requests_first_come_first_served():
    cache = tiny_pool(64)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_num_seqs=2)
    seqs = [make_seq(i, 5, max_tokens=3 + i % 2) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    loop = Loop(scheduler, TapeExecutor(cache))
    done = loop.run()
    assert loop.started == [0, 1, 2, 3, 4]
    assert sorted(s.request_id for s in done) == [0, 1, 2, 3, 4]
    assert all(len(b) <= 2 for _, b in loop.executor.batches)  # type: ignore[union-attr]
    assert_all_correct(seqs, cache)


def test_batch_scheduler_spends_at_most_the_token_budget_decodes_first():
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_batch_tokens=8)
    seqs = [make_seq(i, 10, max_tokens=3) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, executor).run()
    for _, batch in executor.batches:
        assert sum(chunk for _, _, chunk in batch) <= 8
        decoding = [start >= 10 for _, start, _ in batch]
        assert decoding == sorted(decoding, reverse=True)  # decodes before prefill chunks
    # The first prompt is prefilled in chunks of what the budget leaves: 8, then 2 (with the
    # second prompt's first 6 tokens in the same iteration).
    assert executor.batches[0][1] == [(0, 0, 8)]
    assert executor.batches[1][1] == [(0, 8, 2), (1, 0, 6)]
    assert_all_correct(seqs, cache)


def test_batch_scheduler_a_refused_admission_waits_in_order_and_is_retried():
    cache = tiny_pool(64)
    admission = ScriptedAdmission(refuse={1: 3})
    scheduler = batch_scheduler(cache, admission)
    seqs = [make_seq(i, 4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    loop = Loop(scheduler, TapeExecutor(cache))
    loop.step()
    assert [s.request_id for s in scheduler.running] == [0]
    assert [s.request_id for s in scheduler.waiting] == [1, 2]  # 2 does not overtake 1
    loop.run()
    assert admission.asked == [0, 1, 1, 1, 1, 2]
    assert loop.started == [0, 1, 2]
    assert_all_correct(seqs, cache)


def test_batch_scheduler_a_sequence_whose_memory_never_fits_fails_alone():
    cache = tiny_pool(64)
    scheduler = batch_scheduler(cache, ScriptedAdmission(never=(0,)))
    seqs = [make_seq(i, 4) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    done = Loop(scheduler, TapeExecutor(cache)).run()
    assert [s.request_id for s in done if s.error] == [0]
    assert_all_correct(seqs[1:], cache)


def test_out_of_blocks_preempts_the_latest_admitted_which_recomputes_and_finishes_right():
    # Blocks of 4 tokens, 6 in the pool. Three requests run, a fourth waits for room. After the
    # prefill the pool is full (8, 7 and 7 tokens: 2 blocks each), and request 0's first decoded
    # token needs a third block.
    cache = tiny_pool(6)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_num_seqs=3)
    seqs = [make_seq(0, 8, max_tokens=8)] + [make_seq(i, 7, max_tokens=8) for i in (1, 2, 3)]
    for seq in seqs:
        scheduler.add(seq)
    loop = Loop(scheduler, executor)
    while scheduler.num_preemptions == 0:
        loop.step()
    # The most recently admitted one gave way: no blocks, nothing computed, back at the head of
    # the queue (ahead of request 3, which never ran), its output so far kept.
    assert [s.request_id for s in scheduler.running] == [0, 1]
    assert [s.request_id for s in scheduler.waiting] == [2, 3]
    assert seqs[2].block_table == [] and seqs[2].num_computed == 0
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].output_ids
    loop.run()
    assert loop.started == [0, 1, 2, 3]
    # It came back computing its prompt and the output it had so far in one go.
    restarts = [chunk for _, b in executor.batches for rid, start, chunk in b
                if rid == 2 and start == 0]
    assert len(restarts) >= 2 and restarts[1] > 7
    assert_all_correct(seqs, cache)


def test_out_of_blocks_asks_reclaim_before_preempting():
    cache = tiny_pool(6)
    cached_prefix = cache.allocate(2)  # blocks some cache could let go of
    asked: list[int] = []

    def reclaim(blocks: int) -> bool:
        asked.append(blocks)
        if not cached_prefix:
            return False
        cache.release(cached_prefix)
        cached_prefix.clear()
        return True

    scheduler = batch_scheduler(cache, ScriptedAdmission(), reclaim=reclaim)
    seqs = [make_seq(i, 8, max_tokens=4) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, TapeExecutor(cache)).run()
    assert asked and scheduler.num_preemptions == 0
    assert_all_correct(seqs, cache)


def horizon(seq: Sequence) -> int:
    """Tokens ``seq`` will certainly still decode: only ``max_tokens`` stops the fake model."""
    return seq.request.sampling.max_tokens - len(seq.output_ids)


def test_decode_runs_take_the_certain_steps_at_once_and_change_no_output():
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), decode_horizon=horizon)
    seqs = [make_seq(0, 4, max_tokens=9), make_seq(1, 4, max_tokens=6)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, executor).run()
    # A prefill iteration (first token), then a run until the shorter one must stop, then the
    # rest of the longer one: 1 + 5 + 3 = 9 tokens in three iterations.
    assert [steps for steps, _ in executor.batches] == [1, 5, 3]
    assert_all_correct(seqs, cache)


def test_no_decode_run_while_a_waiting_sequence_could_join():
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    # Request 1 is refused a few times: it waits with room to join, so no iteration may skip
    # over the moment it is admitted.
    scheduler = batch_scheduler(cache, ScriptedAdmission(refuse={1: 4}),
                                decode_horizon=horizon)
    seqs = [make_seq(0, 4, max_tokens=12), make_seq(1, 4, max_tokens=2)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, executor).run()
    first_of_1 = next(i for i, (_, b) in enumerate(executor.batches) if b[-1][0] == 1)
    assert all(steps == 1 for steps, _ in executor.batches[:first_of_1])
    assert any(steps > 1 for steps, _ in executor.batches[first_of_1:])
    assert_all_correct(seqs, cache)


def test_a_full_running_set_does_not_stop_decode_runs():
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_num_seqs=1,
                                decode_horizon=horizon)
    seqs = [make_seq(i, 4, max_tokens=6) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, executor).run()
    # Request 1 waits, but could not join anyway: each request runs prefill, then one run.
    assert [steps for steps, _ in executor.batches] == [1, 5, 1, 5]
    assert_all_correct(seqs, cache)


def test_no_decode_run_when_the_pool_would_run_short_in_between():
    # 2 requests x (4 prompt + 8 output) tokens need 6 blocks of 4 by the end; 5 exist.
    cache = tiny_pool(5)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), decode_horizon=horizon)
    seqs = [make_seq(i, 4, max_tokens=8) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    Loop(scheduler, executor).run()
    assert executor.batches[1][0] == 1  # a run of 7 would need 6 blocks
    assert scheduler.num_preemptions > 0
    assert_all_correct(seqs, cache)


@pytest.mark.parametrize("cap", [0, 4])
def test_prefill_beside_decodes_is_capped_and_a_short_reply_finishes_sooner(cap):
    """A long prompt arrives first, then a short one: with ``shared_prefill`` the short
    reply's decode iterations carry at most ``cap`` prefill tokens, so its tokens come in
    cheap iterations; without a cap each of them shares an iteration with a full chunk."""
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    scheduler = BatchScheduler(cache, 8, 16, ScriptedAdmission(), shared_prefill=cap)
    short, long = make_seq(0, 3, max_tokens=6), make_seq(1, 120, max_tokens=2)
    for seq in (short, long):
        scheduler.add(seq)
    loop = Loop(scheduler, executor)
    loop.run()
    tokens_until_short_done = 0
    for _, batch in executor.batches:
        decoding = any(start >= 3 and rid == 0 for rid, start, _ in batch)
        prefill = sum(chunk for rid, start, chunk in batch if rid == 1 and start < 120)
        if decoding and cap:
            assert prefill <= cap
        if any(rid == 0 for rid, _, _ in batch):
            tokens_until_short_done += sum(chunk for _, _, chunk in batch)
    # The tokens computed in the iterations the short request took part in: what its latency
    # is made of on an engine whose iteration time grows with its tokens.
    # The first iteration admits both (3 + 13 tokens); then each of the short one's five
    # decodes shares an iteration with the long prompt's chunk: 15 tokens uncapped, 4 capped.
    assert tokens_until_short_done == (16 + 5 * (1 + cap) if cap else 16 + 5 * 16)
    assert_all_correct([short, long], cache)
    with pytest.raises(ValueError, match="shared_prefill"):
        BatchScheduler(tiny_pool(4), 4, 16, ScriptedAdmission(), shared_prefill=-1)


@pytest.mark.parametrize("cap", [0, 4])
def test_a_capped_long_prompt_lets_a_request_that_arrives_meanwhile_in_at_once(cap):
    cache = tiny_pool(64)
    executor = TapeExecutor(cache)
    scheduler = BatchScheduler(cache, 8, 16, ScriptedAdmission(), shared_prefill=cap)
    long, short = make_seq(0, 120, max_tokens=2), make_seq(1, 3, max_tokens=2)
    scheduler.add(long)
    loop = Loop(scheduler, executor)
    loop.step()  # the long prompt is under way, alone: its whole budget
    scheduler.add(short)
    loop.step()
    # Capped, the long prompt takes 4 tokens and the new request gets in; uncapped it takes
    # the whole iteration and the new one waits until its prompt is done.
    assert executor.batches[1][1] == ([(0, 16, 4), (1, 0, 3)] if cap else [(0, 16, 16)])
    loop.run()
    assert_all_correct([long, short], cache)


@pytest.mark.parametrize("bad", [0, -1])
def test_budgets_below_one_are_refused(bad):
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(bad, ScriptedAdmission())
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchScheduler(tiny_pool(4), 4, bad, ScriptedAdmission())


# -- due times (calls that take simulated time) ------------------------------------------------

def test_waiting_sequences_are_admitted_earliest_due_first_then_in_arrival_order():
    admission = ScriptedAdmission()
    scheduler = Scheduler(1, admission)
    dues = {0: 5.0, 1: 2.0, 2: 5.0, 3: None, 4: 2.0, 5: 1.0, 6: None}
    for request_id, due in dues.items():
        scheduler.add(make_seq(request_id, 3, due=due))
    assert [s.request_id for s in scheduler.waiting] == [5, 1, 4, 0, 2, 3, 6]
    while scheduler.waiting:
        for seq in scheduler.schedule():
            seq.status = SequenceStatus.FINISHED
        scheduler.remove_finished()
    assert admission.asked == [5, 1, 4, 0, 2, 3, 6]


def test_batch_scheduler_admits_a_later_submitted_call_first_when_it_is_due_first():
    cache = tiny_pool(32)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_num_seqs=1)
    seqs = [make_seq(0, 5, due=30.0), make_seq(1, 5, due=10.0), make_seq(2, 5, due=20.0)]
    for seq in seqs:
        scheduler.add(seq)
    loop = Loop(scheduler, TapeExecutor(cache))
    loop.run()
    assert loop.started == [1, 2, 0]
    assert_all_correct(seqs, cache)


def test_out_of_blocks_preempts_the_latest_due_and_requeues_it_by_its_due():
    # As in the preemption test above, but the first admitted request is due last: it gives way
    # (not the most recently admitted one), and waits behind request 3, which is due sooner.
    cache = tiny_pool(6)
    executor = TapeExecutor(cache)
    scheduler = batch_scheduler(cache, ScriptedAdmission(), max_num_seqs=3)
    seqs = [make_seq(0, 8, max_tokens=8, due=1.0), make_seq(1, 7, max_tokens=8, due=9.0),
            make_seq(2, 7, max_tokens=8, due=2.0), make_seq(3, 7, max_tokens=8, due=3.0)]
    for seq in seqs:
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.waiting] == [0, 2, 3, 1]
    loop = Loop(scheduler, executor)
    while scheduler.num_preemptions == 0:
        loop.step()
    assert [s.request_id for s in scheduler.running] == [0, 2]
    assert [s.request_id for s in scheduler.waiting] == [3, 1]
    loop.run()
    assert_all_correct(seqs, cache)
