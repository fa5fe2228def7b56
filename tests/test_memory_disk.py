"""The disk tier and the persistent store: files that check themselves, and what survives a run.

The object file format must refuse anything it did not write whole (a flipped bit, a truncated
file, an entry of another model); the manager must then rebuild the object from its origin
instead of failing the request. Hypothesis runs random workloads over a small device, a tiny
host tier and the disk, damaging random disk files between steps, and checks after every step:
the budgets hold, pinned objects are resident, every object comes back bit-identical, and every
damaged file was noticed. The store is checked across two managers (a second run finds what
the first computed) and for its cap and atomic writes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st
from safetensors.torch import save_file

from runtime.memory import (POLICIES, CorruptObjectFile, KVStore, MemoryEvent, MemoryManager,
                            TensorMemory, WorkingSetTooLarge)
from runtime.memory.kv_store import SUFFIX
from runtime.memory.object_file import read_header, read_object, read_safetensors, write_object


class Counted(TensorMemory):
    """A synthetic computed object with an identity, counting how often it is rebuilt."""

    def __init__(self, key: str, numel: int, seed: int, identity: bool = True) -> None:
        self.builds = 0

        def build() -> dict[str, torch.Tensor]:
            self.builds += 1
            g = torch.Generator().manual_seed(seed)
            return {"k": torch.randn(numel, generator=g),
                    "v": torch.randn(numel, generator=g).to(torch.bfloat16)}
        super().__init__(key, build, kind="prefix_kv", origin="recompute")
        self.builds = 0
        self.identity = {"kind": "test", "seed": seed, "numel": numel} if identity else None

    def reference(self) -> dict[str, torch.Tensor]:
        builds, out = self.builds, self.materialize()
        self.builds = builds
        return out


def assert_identical(obj: Counted) -> None:
    reference = obj.reference()
    assert obj.device is not None and obj.device.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(obj.device[name], tensor), obj.key


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size // 2)
    elif how == "delete":
        path.unlink()
    else:  # flip one bit of the payload (its first byte; a small header fits the first page)
        at = 4096 if how == "payload" else 40
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x10]))


# -- the file format ---------------------------------------------------------------------------


def test_object_files_round_trip_every_dtype_bit_identically(tmp_path) -> None:
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16),
               "i64": torch.arange(10), "empty": torch.empty(0, 4), "bool": torch.tensor([True])}
    path = tmp_path / "o.obj"
    size = write_object(path, tensors, {"model": "m", "tokens": [1, 2]})
    assert size == path.stat().st_size and size % 4096 == 0
    back = read_object(path, {"model": "m", "tokens": (1, 2)})  # tuples compare as lists
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert read_header(path)["meta"] == {"model": "m", "tokens": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".writing-")]


@pytest.mark.parametrize("how, message", [("payload", "payload checksum"),
                                          ("header", "header checksum"),
                                          ("truncate", "truncated")])
def test_a_damaged_object_file_is_refused(tmp_path, how, message) -> None:
    path = tmp_path / "o.obj"
    write_object(path, {"k": torch.randn(5000)}, {"id": 1})
    damage(path, how)
    with pytest.raises(CorruptObjectFile, match=message):
        read_object(path)


def test_an_entry_of_another_identity_is_refused(tmp_path) -> None:
    path = tmp_path / "o.obj"
    write_object(path, {"k": torch.randn(8)}, {"weights": "model-a", "dtype": "float32"})
    with pytest.raises(CorruptObjectFile, match="another object"):
        read_object(path, {"weights": "model-b", "dtype": "float32"})
    (tmp_path / "junk.obj").write_bytes(b"not an object file at all" * 200)
    with pytest.raises(CorruptObjectFile, match="not a memory object file"):
        read_object(tmp_path / "junk.obj")


def test_safetensors_read_with_direct_io_matches_the_safetensors_library(tmp_path) -> None:
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(17, 3), "b": torch.randn(5).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    ours, theirs = read_safetensors(tmp_path / "w.safetensors"), load_file(tmp_path / "w.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -- the persistent store ----------------------------------------------------------------------


def test_a_second_manager_finds_what_the_first_computed(tmp_path) -> None:
    def run() -> tuple[list[Counted], list[dict]]:
        objs = [Counted(f"p{i}", 300, seed=i) for i in range(4)]
        mm = MemoryManager("lru", device_bytes=2 * objs[0].nbytes, host_bytes=0,
                           kv_store=tmp_path / "store")
        rows: list[dict] = []
        mm.listeners.append(lambda event: rows.append(event.row()))
        for step, i in enumerate([0, 1, 2, 3, 0, 2]):
            mm.acquire(step, [objs[i]])
            assert_identical(objs[i])
            mm.release(step)
            mm.check()
        summary = mm.summary()
        mm.close()
        rows.append({"summary": summary})
        return objs, rows

    first, rows1 = run()
    assert sum(o.builds for o in first) == 4  # each computed once: evictions went to the store
    assert rows1[-1]["summary"]["tiers"]["disk"]["written_bytes"] > 0
    assert len(list((tmp_path / "store").glob("*" + SUFFIX))) == 4
    second, rows2 = run()
    assert sum(o.builds for o in second) == 0  # every object came from the store
    assert sum(r.get("op") == "found" for r in rows2) == 4
    tiers = rows2[-1]["summary"]["tiers"]
    assert tiers["disk"]["read_bytes"] == 6 * first[0].nbytes and "recompute" not in tiers


def test_a_damaged_store_entry_is_rebuilt_never_used(tmp_path) -> None:
    store = KVStore(tmp_path / "store")
    obj = Counted("p", 500, seed=3)
    obj.identity = {"kind": "test", "seed": 3}
    # Another object's contents under this identity's name: the header says whose they are.
    write_object(store.path_of(obj.identity), {"k": torch.zeros(500), "v": torch.zeros(500)},
                 {"kind": "test", "seed": 4})
    mm = MemoryManager("lru", device_bytes=10 * obj.nbytes, kv_store=store)
    events: list[MemoryEvent] = []
    mm.listeners.append(events.append)
    mm.acquire(0, [obj])
    assert_identical(obj)
    assert obj.builds == 1 and mm.totals.corrupt == 1
    assert [e.op for e in events][:3] == ["found", "corrupt", "load"]
    mm.release(0)
    mm.close()
    assert read_object(store.path_of(obj.identity), obj.identity)  # rewritten at close, right


def test_the_store_keeps_under_its_cap_dropping_the_least_recently_used(tmp_path) -> None:
    store = KVStore(tmp_path, cap_bytes=3 * 8192)
    paths = []
    for i in range(3):
        paths.append(store.put({"i": i}, {"k": torch.randn(100)}))  # 8 KiB per file
        os.utime(paths[-1], (i, i))  # the use order, made explicit
    store.find({"i": 0})  # used again: now the most recent
    for i in (3, 4):
        store.put({"i": i}, {"k": torch.randn(100)})
    left = {p.name for p in tmp_path.glob("*" + SUFFIX)}
    assert sum(p.stat().st_size for p in tmp_path.glob("*" + SUFFIX)) <= 3 * 8192
    assert left == {store.path_of({"i": i}).name for i in (0, 3, 4)}


def test_store_writes_are_atomic_for_a_concurrent_reader(tmp_path) -> None:
    store = KVStore(tmp_path)
    identity = {"shared": True}
    path = store.path_of(identity)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                read_object(path, identity)
            except FileNotFoundError:
                continue
            except BaseException as exc:  # a half-written file would land here
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(30):
        store.put(identity, {"k": torch.full((20000,), float(i))})
    stop.set()
    thread.join()
    assert not errors
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".writing-")]


# -- host budget -------------------------------------------------------------------------------


def test_host_copies_objects_arrive_with_count_against_the_host_budget(tmp_path) -> None:
    def adapter(key: str) -> TensorMemory:
        obj = TensorMemory(key, lambda: {"w": torch.ones(256)}, kind="adapter", origin="disk")
        obj.host = obj.materialize()
        return obj

    roomy = MemoryManager("lru", device_bytes=10 ** 6, host_bytes=10 ** 6)
    a = roomy.register(adapter("a"))
    assert a.host is not None and roomy.host_used == a.nbytes
    roomy.check()
    none = MemoryManager("lru", device_bytes=10 ** 6, host_bytes=0)
    b = none.register(adapter("b"))
    assert b.host is None and none.host_used == 0
    none.acquire(1, [b])  # re-read from its origin
    assert torch.equal(b.device["w"], torch.ones(256))
    none.check()
    for mm in (roomy, none):
        mm.close()


# -- random workloads over the disk tier, with damage ------------------------------------------


workload = st.fixed_dictionaries({
    "policy": st.sampled_from(sorted(set(POLICIES) - {"belady", "none"})),
    "sizes": st.lists(st.integers(1, 600), min_size=2, max_size=8),
    "identity": st.lists(st.booleans(), min_size=8, max_size=8),
    "device_objects": st.integers(1, 4),
    "host_objects": st.sampled_from([0, 1]),
    "requests": st.lists(st.tuples(st.lists(st.integers(0, 7), min_size=1, max_size=2),
                                   st.sampled_from(["none", "payload", "header", "truncate",
                                                    "delete"])),
                         min_size=1, max_size=16),
})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=workload)
def test_random_workloads_through_disk_with_damage_keep_the_invariants(w, tmp_path) -> None:
    run_dir = tmp_path / str(abs(hash(repr(w))))
    objs = [Counted(f"o{i}", n, seed=i, identity=w["identity"][i])
            for i, n in enumerate(w["sizes"])]
    unit = max(o.nbytes for o in objs)
    mm = MemoryManager(w["policy"], device_bytes=w["device_objects"] * unit,
                       host_bytes=w["host_objects"] * unit, disk_dir=run_dir / "scratch",
                       kv_store=run_dir / "store")
    broken: set[Path] = set()
    try:
        for step, (picks, how) in enumerate(w["requests"]):
            chosen = list({o.key: o for o in (objs[i % len(objs)] for i in picks)}.values())
            try:
                stats = mm.acquire(step, chosen)
            except WorkingSetTooLarge:
                assert sum(o.nbytes for o in chosen) > mm.device_bytes
                continue
            assert stats is not None  # nothing else is held
            for o in chosen:
                assert o.pins == 1 and o.device is not None
                assert_identical(o)
            mm.check()
            mm.release(step)
            mm.tick()
            mm.check()
            on_disk = [o.disk_path for o in objs if o.disk_path is not None
                       and o.disk_path not in broken and o.device is None and o.host is None]
            if how != "none" and on_disk:
                broken.add(on_disk[step % len(on_disk)])
                damage(on_disk[step % len(on_disk)], how)
        for t in list(mm.inflight.values()):
            t.done.wait()
        mm.poll()
        mm.check()
        # Every damaged file that was read since was noticed, and nothing damaged was used.
        assert mm.totals.corrupt <= len(broken)
        target(float(mm.totals.corrupt))  # steer toward runs that read damaged files
    finally:
        mm.close()
    assert not list((run_dir / "scratch").glob("*.obj"))  # the run's scratch files are gone


def test_read_buffers_are_reused_only_once_nothing_views_them(tmp_path) -> None:
    a, b = torch.randn(300_000), torch.randn(300_000)
    write_object(tmp_path / "a.obj", {"t": a})
    write_object(tmp_path / "b.obj", {"t": b})
    first = read_object(tmp_path / "a.obj")
    second = read_object(tmp_path / "b.obj")  # must not land in the buffer `first` views
    assert torch.equal(first["t"], a) and torch.equal(second["t"], b)
    address = first["t"].data_ptr()
    del first
    again = read_object(tmp_path / "b.obj")  # the freed buffer is taken again
    assert again["t"].data_ptr() == address and torch.equal(again["t"], b)
    assert torch.equal(second["t"], b)
