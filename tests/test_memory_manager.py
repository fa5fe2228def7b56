"""The memory manager's invariants on random workloads of synthetic tensor objects.

Hypothesis drives random sequences of requests (each a random subset of objects, some shared by
several agents) through acquire / release / tick under every policy, with random device, host and
disk budgets, and checks after every step: the device budget holds, pinned objects are resident,
and every object read back after eviction is bit-identical to the original.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from runtime.memory import (POLICIES, AgentMemory, FutureSequence, AdapterFile, MemoryEvent,
                            MemoryManager, TensorMemory, WorkingSetTooLarge)
from runtime.request import RequestError


def synthetic(key: str, numel: int, kind: str = "adapter", origin: str = "recompute",
              seed: int = 0) -> TensorMemory:
    def build() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"a": torch.randn(numel, generator=g), "b": torch.arange(3, dtype=torch.int64)}
    return TensorMemory(key, build, kind=kind, origin=origin)


class FixedDistances:
    """A DistanceSource whose distances the test sets by hand."""

    def __init__(self) -> None:
        self.d: dict[str, float] = {}

    def distance(self, agent_id: str) -> float:
        return self.d.get(agent_id, math.inf)

    def nearest(self, k: int) -> list[str]:
        return sorted(self.d, key=self.d.get)[:k]


def assert_identical(obj: AgentMemory) -> None:
    reference = obj.materialize()
    assert obj.device.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(obj.device[name], tensor), obj.key


workload = st.fixed_dictionaries({
    "policy": st.sampled_from(sorted(POLICIES)),
    "sizes": st.lists(st.integers(1, 64), min_size=2, max_size=10),
    "device_objects": st.integers(1, 6),
    "host_objects": st.one_of(st.none(), st.integers(0, 4)),
    "disk": st.booleans(),
    "requests": st.lists(st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=3),
                                   st.booleans()), min_size=1, max_size=25),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=workload)
def test_random_workloads_keep_the_invariants(w, tmp_path) -> None:
    sizes = w["sizes"]
    objs = [synthetic(f"o{i}", n, kind=("adapter", "prefix_kv", "model")[i % 3], seed=i)
            for i, n in enumerate(sizes)]
    unit = max(o.nbytes for o in objs)
    agents = [f"a{i}" for i in range(len(objs))]
    sequence = [agents[i % len(objs)] for r, _ in w["requests"] for i in r]
    source = FutureSequence(sequence) if w["policy"] == "belady" else FixedDistances()
    host = None if w["host_objects"] is None else w["host_objects"] * unit
    mm = MemoryManager(w["policy"], device_bytes=w["device_objects"] * unit, host_bytes=host,
                       disk_dir=tmp_path / "disk" if w["disk"] else None, distance=source,
                       lookahead=4)
    events: list[MemoryEvent] = []
    mm.listeners.append(events.append)
    for i, o in enumerate(objs):
        mm.register(o, users=[agents[i], agents[(i + 1) % len(objs)]])  # every object shared
    try:
        held = []
        for step, (picks, keep) in enumerate(w["requests"]):
            chosen = [objs[i % len(objs)] for i in picks]
            if isinstance(source, FixedDistances):
                source.d = {a: (step * 7 + 13 * j) % 11 for j, a in enumerate(agents)}
            for o in chosen:
                if isinstance(source, FutureSequence):
                    source.on_submit(next(iter(o.users)))
            try:
                stats = mm.acquire(step, chosen)
            except WorkingSetTooLarge:
                assert sum(o.nbytes for o in {o.key: o for o in chosen}.values()) > mm.device_bytes
                continue
            mm.check()
            if stats is None:  # blocked by the requests still held: they must be pinning space
                assert held
            else:
                for o in chosen:
                    assert o.pins > 0 and o.device is not None
                    assert_identical(o)
                assert sum(stats.hits.values()) + sum(stats.misses.values()) == len(
                    {o.key for o in chosen})
                held.append(step)
            if not keep:
                while held:
                    mm.release(held.pop())
            mm.tick()
            mm.check()
        for owner in held:
            mm.release(owner)
        mm.tick()
        for t in list(mm.inflight.values()):
            t.done.wait()
        mm.poll()
        mm.check()
        for o in mm.resident.values():
            assert_identical(o)
        if w["policy"] == "none":
            assert not mm.resident
    finally:
        mm.close()
    assert all(e.op in {"load", "prefetch", "abort", "evict", "drop", "recompute", "preload"}
               for e in events)


def test_a_working_set_larger_than_the_device_fails_with_a_clear_error() -> None:
    mm = MemoryManager("lru", device_bytes=1000)
    big = synthetic("huge", 1000)
    with pytest.raises(WorkingSetTooLarge, match=r"request 7: .*huge.*device_bytes"):
        mm.acquire(7, [big])
    assert isinstance(WorkingSetTooLarge("x"), RequestError)
    mm.close()


def test_pinned_objects_are_never_evicted_and_a_full_device_defers() -> None:
    a, b = synthetic("a", 100), synthetic("b", 100)
    mm = MemoryManager("lru", device_bytes=a.nbytes + 10)
    assert mm.acquire(1, [a]) is not None
    assert mm.acquire(2, [b]) is None  # a is pinned: b must wait, nothing is evicted
    assert a.device is not None and b.device is None and a.pins == 1 and b.pins == 0
    mm.release(1)
    stats = mm.acquire(2, [b])
    assert stats.misses == {"adapter": 1} and a.device is None
    mm.check()
    mm.close()


def test_evicted_objects_come_back_bit_identical_from_host_and_disk(tmp_path) -> None:
    objs = [synthetic(f"o{i}", 256, seed=i) for i in range(4)]
    unit = objs[0].nbytes
    mm = MemoryManager("fifo", device_bytes=unit, host_bytes=unit, disk_dir=tmp_path)
    events: list[MemoryEvent] = []
    mm.listeners.append(events.append)
    for step, i in enumerate([0, 1, 0, 2, 1, 3, 0]):
        mm.acquire(step, [objs[i]])
        assert_identical(objs[i])
        mm.release(step)
        mm.check()
    tiers = {(e.op, e.tier_from, e.tier_to) for e in events}
    assert ("evict", "device", "host") in tiers
    assert ("evict", "device", "disk") in tiers or ("evict", "host", "disk") in tiers
    assert ("load", "disk", "device") in tiers and ("load", "host", "device") in tiers
    mm.close()


def test_lru_evicts_the_least_recent_and_scalesim_the_farthest() -> None:
    def run(policy: str) -> str:
        objs = {k: synthetic(k, 64) for k in "abc"}
        src = FixedDistances()
        src.d = {"a": 1, "b": 50, "c": 0}
        mm = MemoryManager(policy, device_bytes=2 * objs["a"].nbytes, distance=src)
        for k in "abc":
            mm.register(objs[k], users=[k])
        for k in "ab":  # a then b: LRU victim is a, distance victim is b (farthest)
            mm.acquire(k, [objs[k]])
            mm.release(k)
        mm.acquire("c", [objs["c"]])
        gone = [k for k, o in objs.items() if o.device is None]
        mm.close()
        return gone[0]

    assert run("lru") == "a"
    assert run("scalesim") == "b"


def test_scalesim_prefetches_the_nearest_but_never_evicts_something_nearer() -> None:
    objs = {k: synthetic(k, 64) for k in "abcd"}
    src = FixedDistances()
    mm = MemoryManager("scalesim", device_bytes=2 * objs["a"].nbytes, distance=src, lookahead=4)
    for k, o in objs.items():
        mm.register(o, users=[k])
    src.d = {"a": 1, "b": 2, "c": 3, "d": 4}
    mm.tick()
    for t in list(mm.inflight.values()):
        t.done.wait()
    mm.poll()
    assert {k for k, o in objs.items() if o.device is not None} == {"a", "b"}
    src.d = {"a": 1, "b": 9, "c": 0.5, "d": 10}  # c overtakes b; d still farther than both
    mm.tick()
    for t in list(mm.inflight.values()):
        t.done.wait()
    mm.poll()
    assert {k for k, o in objs.items() if o.device is not None} == {"a", "c"}
    stats = mm.acquire("c", [objs["c"]])
    assert stats.hits == {"adapter": 1} and stats.bytes_loaded == 0
    mm.check()
    mm.close()


class RecomputeOnly(TensorMemory):
    """A prefix-KV-like object: only the model's thread can rebuild it (no copy once dropped)."""

    threadsafe = False


def test_a_prefetch_never_pushes_out_an_object_that_would_have_to_be_recomputed() -> None:
    # A prefetch only hides one copy; evicting a prefix KV with no host copy for it would cost a
    # re-prefill whenever the prediction is wrong, so only a demand load may do that.
    far = RecomputeOnly("far", synthetic("far", 64)._build, kind="prefix_kv")
    near = synthetic("near", 64)
    src = FixedDistances()
    mm = MemoryManager("scalesim", device_bytes=far.nbytes, host_bytes=0, distance=src)
    mm.register(far, users=["f"])
    mm.register(near, users=["n"])
    src.d = {"f": 0}
    mm.acquire("f", [far])
    mm.release("f")
    src.d = {"f": 9, "n": 1}
    mm.tick()
    assert far.device is not None and not mm.inflight
    stats = mm.acquire("n", [near])  # the demand load does evict it
    assert stats.misses == {"adapter": 1} and far.device is None
    mm.check()
    mm.close()


def test_an_urgent_load_preempts_a_running_prefetch() -> None:
    started = threading.Event()

    class Slow(TensorMemory):
        def materialize(self):
            started.set()
            return super().materialize()

    far = Slow("far", lambda: {"x": torch.ones(1 << 18)})  # 1 MiB, 1 s over a 1 MB/s link
    near = synthetic("near", 16)
    src = FixedDistances()
    src.d = {"f": 5}
    mm = MemoryManager("scalesim", device_bytes=far.nbytes + near.nbytes, distance=src,
                       link_gbps=0.001, chunk_bytes=4096)
    events: list[MemoryEvent] = []
    mm.listeners.append(events.append)
    mm.register(far, users=["f"])
    mm.tick()
    started.wait(5)
    stats = mm.acquire("n", [near])  # urgent: the prefetch must abort between chunks
    assert stats.misses == {"adapter": 1}
    far_transfer = mm.inflight.get("far")
    if far_transfer is not None:
        far_transfer.done.wait(5)
        mm.poll()
    assert [e.op for e in events if e.object == "far"] == ["abort"]
    assert far.device is None
    mm.check()
    mm.close()


def test_a_world_defined_kind_and_a_lora_file(tmp_path) -> None:
    class Notes(AgentMemory):
        kind = "notes"
        origin = "recompute"

        def materialize(self):
            return {"v": torch.full((10,), 3.0)}

    adir = tmp_path / "adapter"
    adir.mkdir()
    weights = {"lora_A": torch.randn(4, 8), "lora_B": torch.randn(8, 4)}
    save_file(weights, str(adir / "adapter_model.safetensors"))
    lora = AdapterFile(adir)
    assert lora.nbytes == 2 * 32 * 4
    notes = Notes("notes:ann", 40)
    mm = MemoryManager("lru", device_bytes=lora.nbytes + 40)
    stats = mm.acquire(0, [lora, notes])
    assert stats.misses == {"adapter": 1, "notes": 1}
    assert torch.equal(mm.tensors(lora)["lora_B"], weights["lora_B"])
    assert torch.equal(mm.tensors(notes)["v"], torch.full((10,), 3.0))
    mm.close()


def test_a_shared_object_is_stored_once_at_the_distance_of_its_nearest_user() -> None:
    src = FixedDistances()
    src.d = {"ann": 9, "bob": 2}
    mm = MemoryManager("scalesim", device_bytes=10_000, distance=src)
    first = mm.register(synthetic("group", 8), users=["ann"])
    second = mm.register(synthetic("group", 8), users=["bob"])
    assert first is second and first.users == {"ann", "bob"}
    assert mm.distance_of(first) == 2
    assert mm.keys_of("ann") == mm.keys_of("bob") == ["group"]
    mm.close()


def test_infinite_never_evicts() -> None:
    mm = MemoryManager("infinite", device_bytes=1)
    objs = [synthetic(f"o{i}", 100) for i in range(5)]
    for i, o in enumerate(objs):
        mm.acquire(i, [o])
        mm.release(i)
    assert len(mm.resident) == 5 and mm.device_bytes == math.inf
    mm.close()


def test_future_sequence_lists_waiting_agents_in_submission_order() -> None:
    # The engine admits waiting calls first come, first served; nearest() must list them so, or
    # belady prefetches for the calls that run last (it used to keep first-ever-call order).
    future = FutureSequence(["a", "b", "a", "b", "c"])
    future.on_submit("a")
    future.on_submit("b")
    future.on_finish("a")
    future.on_finish("b")
    future.on_submit("b")
    future.on_submit("a")
    assert future.nearest(2) == ["b", "a"]
    assert future.nearest(3) == ["b", "a", "c"]
    assert future.distance("a") == future.distance("b") == 0.0


def test_a_memory_event_row_is_every_field_in_declaration_order():
    from dataclasses import asdict

    event = MemoryEvent(wall=1.5, object="adapter:a", kind="adapter", op="load", bytes=7,
                        tier_from="host", tier_to="device", cause="demand", distance=2.0)
    row = event.row()
    assert row == asdict(event) and list(row) == list(asdict(event))
