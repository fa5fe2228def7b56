"""The contract of :class:`runtime.admission.MemoryAdmission`, on a real manager and no model.

Admission acquires a request's memory objects once (a preempted sequence is admitted again and
keeps its pins), releases them once (writing the request's memory statistics once), turns a
prefix KV hit into a miss when the first prefix lookup could not reuse it, and fails a request
whose objects can never fit the device. The objects are small :class:`TensorMemory` objects.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable

import torch

from runtime.admission import MemoryAdmission
from runtime.memory import AgentMemory, MemoryManager, TensorMemory
from runtime.request import MemoryStats, Request
from runtime.sequence import Sequence, SequenceStatus

NUMEL = 16
NBYTES = NUMEL * 4  # one float32 tensor


def tensor_object(key: str, kind: str, numel: int = NUMEL) -> TensorMemory:
    return TensorMemory(key, lambda: {"t": torch.ones(numel)}, kind=kind)


class Agents:
    """An executor's ``memory_objects``: each agent's adapter and prefix KV, named once."""

    def __init__(self, numel: int = NUMEL) -> None:
        self.numel = numel
        self.objects: dict[str, list[AgentMemory]] = {}

    def __call__(self, seq: Sequence) -> list[Any]:
        agent = seq.request.agent_id
        if agent not in self.objects:
            self.objects[agent] = [tensor_object(f"adapter:{agent}", "adapter", self.numel),
                                   tensor_object(f"prefix_kv:{agent}", "prefix_kv", self.numel)]
        return list(self.objects[agent])


class CountingManager(MemoryManager):
    """A real manager that counts the admission's calls into it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquired: list[Hashable] = []
        self.released: list[Hashable] = []

    def acquire(self, owner: Hashable, objects: Iterable[AgentMemory]) -> MemoryStats | None:
        self.acquired.append(owner)
        return super().acquire(owner, list(objects))

    def release(self, owner: Hashable) -> None:
        self.released.append(owner)
        super().release(owner)


def sequence(agent: str, request_id: int) -> Sequence:
    return Sequence(Request(agent, "hi", request_id=request_id), prefix_ids=[], prompt_ids=[1])


def admission(device_objects: int | None = 8, numel: int = NUMEL) -> MemoryAdmission:
    device = None if device_objects is None else device_objects * numel * 4
    return MemoryAdmission(CountingManager("lru", device_bytes=device, host_bytes=0),
                           Agents(numel))


def test_admit_acquires_once_and_a_preempted_sequence_keeps_its_pins() -> None:
    adm = admission()
    manager = adm.manager
    assert isinstance(manager, CountingManager)
    seq = sequence("ann", 1)
    adm.register(seq)
    assert [o.key for o in seq.memory_objects] == ["adapter:ann", "prefix_kv:ann"]
    assert manager.keys_of("ann") == ["adapter:ann", "prefix_kv:ann"]
    assert adm.admit(seq)
    assert adm.admit(seq)  # preempted and admitted again
    assert manager.acquired == [1]
    assert all(o.pins == 1 and o.device is not None for o in seq.memory_objects)
    assert manager.held_by(1) == seq.memory_objects
    manager.check()
    adm.release(seq)
    assert all(o.pins == 0 for o in seq.memory_objects)
    manager.check()
    adm.close()


def test_release_unpins_once_and_writes_the_statistics_once() -> None:
    adm = admission()
    manager = adm.manager
    assert isinstance(manager, CountingManager)
    never = sequence("bob", 7)
    adm.register(never)
    adm.release(never)  # never admitted: nothing to release
    assert manager.released == [] and never.memory.hits == {} and never.memory.misses == {}

    seq = sequence("ann", 1)
    adm.register(seq)
    assert adm.admit(seq)
    adm.release(seq)
    stats = seq.memory
    assert stats.misses == {"adapter": 1, "prefix_kv": 1} and stats.hits == {}
    assert stats.bytes_loaded == 2 * NBYTES
    adm.release(seq)  # a second release changes nothing
    assert manager.released == [1]
    assert seq.memory is stats and stats.misses == {"adapter": 1, "prefix_kv": 1}
    assert all(o.pins == 0 for o in seq.memory_objects)
    manager.check()

    again = sequence("ann", 2)  # the same agent's next call finds its objects resident
    adm.register(again)
    assert adm.admit(again)
    adm.release(again)
    assert again.memory.hits == {"adapter": 1, "prefix_kv": 1} and again.memory.misses == {}
    assert again.memory.bytes_loaded == 0
    adm.close()


def test_a_prefix_the_lookup_could_not_reuse_is_a_miss() -> None:
    adm = admission()
    warm = sequence("ann", 1)
    adm.register(warm)
    assert adm.admit(warm)
    adm.release(warm)
    for request_id, prefix_hit in ((2, False), (3, True), (4, None)):
        seq = sequence("ann", request_id)
        adm.register(seq)
        assert adm.admit(seq)
        seq.prefix_hit = prefix_hit  # what the executor's first prefix lookup found
        adm.release(seq)
        if prefix_hit is False:  # resident, but its KV could not be reused: counted a miss
            assert seq.memory.hits == {"adapter": 1}
            assert seq.memory.misses == {"prefix_kv": 1}
        else:
            assert seq.memory.hits == {"adapter": 1, "prefix_kv": 1}
            assert seq.memory.misses == {}
    adm.manager.check()
    adm.close()


def test_a_working_set_larger_than_the_device_fails_the_sequence() -> None:
    adm = admission(device_objects=1)  # room for one of the agent's two objects
    seq = sequence("ann", 1)
    adm.register(seq)
    assert not adm.admit(seq)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "error"
    assert seq.error is not None and "device budget" in seq.error
    assert all(o.pins == 0 and o.device is None for o in seq.memory_objects)
    adm.release(seq)  # a failed sequence is released like any other: harmless
    assert adm.manager.held_by(1) == []
    adm.manager.check()
    adm.close()


def test_a_device_full_of_pinned_objects_defers_admission_without_failing() -> None:
    adm = admission(device_objects=2)  # one agent's objects at a time
    first, second = sequence("ann", 1), sequence("bob", 2)
    adm.register(first)
    adm.register(second)
    assert adm.admit(first)
    assert not adm.admit(second)  # ann's objects are pinned: wait
    assert second.status is SequenceStatus.WAITING and second.error is None
    assert all(o.pins == 0 for o in second.memory_objects)
    adm.manager.check()
    adm.release(first)
    assert adm.admit(second)  # ann's objects are evicted for bob's
    assert all(o.device is None for o in first.memory_objects)
    adm.release(second)
    assert second.memory.misses == {"adapter": 1, "prefix_kv": 1}
    adm.manager.check()
    adm.close()
