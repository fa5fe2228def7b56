"""The prefix cache (:mod:`runtime.prefix_cache`) under the real scheduler, admission and memory
manager, with no model: a stand-in executor writes into each KV slot a value that depends on
every token up to it, and checks every slot a sequence reads. Whatever the cache reuses, loads
back from the host or disk, splits or evicts, a sequence must read exactly the KV it would have
computed itself.

Hypothesis drives workloads of agents that share a preamble, keep personas and grow histories,
under every policy, small budgets and a small pool (preemption), with cancellations; after every
iteration the manager's and the tree's invariants hold, and every block's reference count is the
number of its holders (segments and sequences). At the end, evicting everything returns every
block to the pool.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime.admission import MemoryAdmission
from runtime.kv_cache import KVCache
from runtime.memory import MemoryManager
from runtime.prefix_cache import PrefixTree
from runtime.request import Request, SamplingParams
from runtime.scheduler import BatchScheduler
from runtime.sequence import Sequence, SequenceStatus

BS = 4


def kv_value(tokens: list[int]) -> float:
    """The 'KV' of the last of ``tokens``: depends on all of them and on their positions."""
    h = 0
    for t in tokens:
        h = (h * 31 + t + 7) % 1_000_003
    return float(h)


class StandIn:
    """Computes chunks by writing :func:`kv_value` and checks every slot it reads."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.computed = 0

    def execute(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            tokens = seq.all_token_ids
            table = seq.block_table
            for p in range(seq.num_computed):  # what attention would read
                got = self.cache.k[0, table[p // BS], p % BS, 0, 0].item()
                assert got == kv_value(tokens[:p + 1]), (seq.request_id, p)
            for p in range(seq.num_computed, seq.num_computed + seq.chunk):
                value = kv_value(tokens[:p + 1])
                self.cache.k[0, table[p // BS], p % BS, 0, 0] = value
                self.cache.v[0, table[p // BS], p % BS, 0, 0] = -value
            self.computed += seq.chunk
            seq.num_computed += seq.chunk
            seq.chunk = 0
            if seq.num_computed == seq.num_tokens:
                seq.append_tokens([500 + (sum(tokens) + seq.request_id) % 7])
                if len(seq.output_ids) >= seq.request.sampling.max_tokens:
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "length"


class Rig:
    """Scheduler, admission, manager and tree over one small pool."""

    def __init__(self, policy: str, device_blocks: int | None, host_blocks: int | None,
                 pool_blocks: int, disk: str | None = None) -> None:
        self.cache = KVCache(1, pool_blocks, BS, 1, 1)
        nbytes = self.cache.block_nbytes
        self.manager = MemoryManager(
            policy, device_bytes=None if device_blocks is None else device_blocks * nbytes,
            host_bytes=None if host_blocks is None else host_blocks * nbytes, disk_dir=disk)
        self.tree = PrefixTree(self.cache, self.manager)
        self.admission = MemoryAdmission(self.manager, self.tree.path)
        self.scheduler = BatchScheduler(
            self.cache, 3, 12, self.admission, prefixes=self.tree,
            reclaim=self.admission.reclaim_prefix_blocks(nbytes))
        self.executor = StandIn(self.cache)
        self.ids = 0
        self.done: list[Sequence] = []

    def submit(self, agent: str, prefix: list[int], prompt: list[int],
               max_tokens: int) -> Sequence | None:
        """Queue a call (``None``: it could never fit the pool; the engine rejects those)."""
        self.ids += 1
        request = Request(agent, "", sampling=SamplingParams(max_tokens=max_tokens),
                          request_id=self.ids)
        seq = Sequence(request, list(prefix), list(prompt))
        if self.cache.blocks_for(seq.num_prompt_tokens + max_tokens) > self.cache.num_blocks:
            return None
        self.admission.register(seq)
        self.scheduler.add(seq)
        return seq

    def step(self) -> None:
        batch = self.scheduler.schedule()
        self.executor.execute(batch.seqs)
        for seq in self.scheduler.remove_finished():
            self.admission.release(seq)
            self.done.append(seq)
        self.manager.tick()
        self.check()

    def run(self) -> None:
        for _ in range(10_000):
            if not self.scheduler.has_work():
                return
            self.step()
        raise AssertionError("the workload did not finish")

    def check(self) -> None:
        self.manager.check()
        self.tree.check()
        holders = [0] * self.cache.num_blocks
        for seg in self.tree.segments():
            for b in seg.blocks:
                holders[b] += 1
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            for b in seq.block_table:
                holders[b] += 1
        assert holders == [self.cache.refs(b) for b in range(self.cache.num_blocks)]


def conversation(rng: random.Random, agents: int, calls: int, preamble: int,
                 persona: int) -> list[tuple[str, list[int], list[int], int]]:
    """Calls of agents that share a preamble, each with its persona and a growing history."""
    shared = [rng.randrange(100) for _ in range(preamble)]
    personas = {f"a{i}": shared + [100 + i] * persona for i in range(agents)}
    history: dict[str, list[int]] = {a: [] for a in personas}
    out = []
    for _ in range(calls):
        agent = rng.choice(sorted(personas))
        turn = [rng.randrange(200, 300) for _ in range(rng.randrange(1, 7))]
        if rng.random() < 0.1:
            history[agent] = history[agent][: len(history[agent]) // 2]  # a rewritten history
        history[agent] = history[agent] + turn
        out.append((agent, personas[agent], list(history[agent]), rng.randrange(1, 5)))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6),
       policy=st.sampled_from(["lru", "scalesim", "fifo", "lfu", "unlimited", "none"]),
       device_blocks=st.sampled_from([None, 6, 12, 30]),
       host_blocks=st.sampled_from([None, 0, 8]),
       pool_blocks=st.sampled_from([14, 24, 64]),
       batch=st.integers(1, 6))
def test_every_read_is_what_would_have_been_computed(seed, policy, device_blocks, host_blocks,
                                                    pool_blocks, batch) -> None:
    rng = random.Random(seed)
    rig = Rig(policy, device_blocks, host_blocks, pool_blocks)
    try:
        _run_workload(rig, rng, batch)
    finally:
        rig.manager.close()


def _run_workload(rig: Rig, rng: random.Random, batch: int) -> None:
    calls = conversation(rng, agents=3, calls=18, preamble=rng.choice([0, 5, 9]), persona=6)
    pending = list(calls)
    while pending or rig.scheduler.has_work():
        for agent, prefix, prompt, max_tokens in pending[:batch]:
            seq = rig.submit(agent, prefix, prompt, max_tokens)
            if seq is not None and rng.random() < 0.1:
                rig.scheduler.cancel(seq.request_id, "gone")
        pending = pending[batch:]
        for _ in range(rng.randrange(1, 4)):
            if rig.scheduler.has_work():
                rig.step()
    rig.run()
    assert all(s.error in (None, "gone") for s in rig.done), [s.error for s in rig.done]
    # Refcounts return to zero: with everything evicted, every block is free again.
    rig.manager.reclaim(10**12)
    rig.tree.sweep()
    rig.check()
    assert rig.cache.num_free == rig.cache.num_blocks


def test_a_shared_preamble_is_computed_once_and_split_where_agents_part() -> None:
    rig = Rig("lru", None, None, 64)
    preamble = list(range(1, 13))  # three blocks shared by everyone
    first = rig.submit("ann", preamble + [50] * 5, [60, 61], 1)
    rig.run()
    assert first.cached_tokens == 0
    second = rig.submit("bob", preamble + [70] * 5, [60, 61], 1)
    rig.run()
    assert second.cached_tokens == 12 and second.prefix_hit is False  # preamble, not persona
    roots = [s for s in rig.tree.segments() if s.parent is None]
    assert len(roots) == 1 and roots[0].tokens == tuple(preamble)
    assert roots[0].users == {"ann", "bob"}
    assert {c.creator for c in roots[0].children.values()} == {"ann", "bob"}
    again = rig.submit("bob", preamble + [70] * 5, [60, 61], 1)
    rig.run()
    assert again.prefix_hit is True and again.cached_tokens == 16


def test_a_growing_history_reuses_every_earlier_turn() -> None:
    rig = Rig("lru", None, None, 64)
    persona, history = [9] * 8, []
    computed = []
    for turn in range(6):
        history += [100 + turn] * 5
        before = rig.executor.computed
        seq = rig.submit("ann", persona, list(history), 2)
        rig.run()
        computed.append(rig.executor.computed - before)
        if turn:  # only the new turn and the partial blocks around it are computed
            assert seq.num_prompt_tokens - seq.cached_tokens < 5 + 2 * BS
    assert sum(computed) < 0.5 * sum(8 + 5 * (t + 1) for t in range(6))


def test_eviction_is_leaf_first_and_a_branch_reloads_bit_identical() -> None:
    rig = Rig("lru", 6, None, 64)  # room for six blocks of cached KV: one agent and a half
    rig.submit("ann", [1] * 8, [2] * 9, 1)
    rig.run()
    ann = [s for s in rig.tree.segments() if "ann" in s.users]
    leaf = next(s for s in ann if not s.children)
    # Another agent's KV pushes ann's out: her continuation goes before her persona.
    order = []
    rig.manager.listeners.append(lambda e: order.append(e.object) if e.op == "evict" else None)
    rig.submit("bob", [3] * 8, [4] * 9, 1)
    rig.run()
    evicted = [k for k in order if k.startswith("prefix_kv:ann")]
    assert evicted and evicted[0] == leaf.key
    assert all(s.host is not None for s in ann if s.device is None)
    back = rig.submit("ann", [1] * 8, [2] * 9 + [5] * 3, 1)
    rig.run()  # StandIn checks every reused slot: the reload is bit-identical
    assert back.cached_tokens >= 16


@pytest.mark.parametrize("policy", ["lru", "scalesim"])
def test_disk_tier_round_trip(policy, tmp_path) -> None:
    rig = Rig(policy, 6, 0, 32, disk=str(tmp_path))
    for agent, fill in (("ann", 1), ("bob", 3), ("cy", 5), ("ann", 1)):
        rig.submit(agent, [fill] * 8, [fill + 1] * 9, 1)
        rig.run()
    assert rig.manager.totals.read_bytes["disk"] > 0
    rig.manager.reclaim(10**12)
    rig.tree.sweep()
    rig.check()
    assert rig.cache.num_free == rig.cache.num_blocks


def test_agents_that_call_at_once_compute_a_shared_preamble_once() -> None:
    """Requests whose next uncached block a running prefill is computing wait for it, then
    reuse it (in their order in the queue), rather than computing it alongside."""
    rig = Rig("lru", None, None, 64)
    preamble = list(range(1, 13))  # three blocks
    seqs = [rig.submit(f"a{i}", preamble + [50 + i] * 5, [60], 1) for i in range(4)]
    rig.run()
    assert [s.cached_tokens for s in seqs] == [0, 12, 12, 12]
    assert rig.executor.computed == 4 * 18 - 3 * 12  # 18 prompt tokens each
    assert [s.request_id for s in rig.done] == [s.request_id for s in seqs]
