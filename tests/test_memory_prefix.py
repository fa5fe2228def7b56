"""Prefix KV (the prefix cache's segments) under the memory manager, in the real torch engine:
one device budget with the adapters, host offload that reloads bit-identically, drop +
re-prefill with the same outputs, the persistent store across engines."""

from __future__ import annotations

import pytest
import torch

from experiments.make_adapters import make_adapters
from runtime import Request, SamplingParams
from runtime.engine import Engine, build_engine
from runtime.memory import MemoryEvent
from runtime.model.profiles import PROFILES

pytestmark = [pytest.mark.model, pytest.mark.slow]  # minutes on a shared 2-core CPU

PERSONAS = ["You are Ada, a cheerful baker who loves rye bread and early mornings.",
            "You are Bo, a grumpy fisherman who talks about the weather all day long.",
            "You are Cy, a shy librarian who recommends old novels to everyone.",
            "You are Di, a loud blacksmith who hums while working the forge."]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    return make_adapters(out, PROFILES["smollm2-135m"], n=4, rank=4, seed=3, b_std=0.05)


def make_engine(hf, policy: str = "lru", max_num_seqs: int = 2, kv_cache_dtype: str = "auto",
                **memory) -> Engine:
    model, tokenizer = hf
    return build_engine("torch", hf_model=model, tokenizer=tokenizer, kv_cache_tokens=2048,
                        max_num_seqs=max_num_seqs, max_batch_tokens=256, policy=policy,
                        kv_cache_dtype=kv_cache_dtype, **memory)


def calls(adapters: list[str] | None, rounds: int = 2) -> list[Request]:
    return [Request(f"agent{i}", f"Round {r}: say hello.", prefix=PERSONAS[i],
                    adapter=adapters[i] if adapters else None,
                    sampling=SamplingParams(max_tokens=4))
            for r in range(rounds) for i in range(len(PERSONAS))]


def device_bytes_in_use(eng: Engine) -> int:
    """What really sits on the device: adapters in LoRA slots plus prefix blocks in the pool."""
    ex = eng.executor
    adapters = sum(o.nbytes for o in eng.memory.objects.values()
                   if o.kind == "adapter" and o.adapter.slot is not None)
    blocks = len({b for seg in ex.prefixes.segments() for b in seg.blocks})
    return adapters + blocks * ex.cache.block_nbytes


def serve(eng: Engine, requests: list[Request], check=None) -> dict[int, object]:
    ids = [eng.submit(r) for r in requests]
    done = {}
    while eng.has_work():
        for c in eng.step().finished:
            assert c.ok, c.error
            done[c.request_id] = c
        if check is not None:
            check()
    return [done[i] for i in ids]


def prefix_object(eng: Engine, agent: str):
    """The segment that holds ``agent``'s persona (the tree's first segment on its path)."""
    return next(o for o in eng.memory.objects.values()
                if o.kind == "prefix_kv" and o.parent is None and agent in o.users)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_offloaded_prefix_reloads_bit_identical(hf, kv_cache_dtype) -> None:
    eng = make_engine(hf, "lru", device_bytes=10**9, kv_cache_dtype=kv_cache_dtype)
    manager = eng.memory
    serve(eng, calls(None, rounds=1)[:1])
    obj = prefix_object(eng, "agent0")
    before = obj.device_tensors()
    assert before and obj.blocks
    assert manager.reclaim(10**12, kind="prefix_kv") >= obj.nbytes
    assert obj.device is None and not obj.blocks and obj.host is not None
    assert all(torch.equal(obj.host[k], before[k]) for k in before)
    second = serve(eng, [Request("agent0", "Again?", prefix=PERSONAS[0],
                                 sampling=SamplingParams(max_tokens=2))])[0]
    assert second.memory.misses == {"prefix_kv": 1} and second.cached_tokens > 0
    after = obj.device_tensors()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert eng.executor.reprefill_tokens == 0
    manager.check()
    manager.close()


def test_dropped_prefix_is_recomputed_with_the_same_outputs(hf) -> None:
    reference = make_engine(hf, "infinite")
    want = [c.text for c in serve(reference, calls(None))]
    reference.memory.close()
    eng = make_engine(hf, "lru", device_bytes=10**9, host_bytes=0)  # no host tier: drop
    manager = eng.memory
    got = []
    for r in calls(None):
        got += serve(eng, [r])
        manager.reclaim(10**12, kind="prefix_kv")  # every prefix is dropped after each call
    assert [c.text for c in got] == want
    assert eng.executor.reprefill_tokens > 0
    assert all(c.memory.misses.get("prefix_kv") == 1 for c in got)
    manager.check()
    manager.close()


def test_policies_keep_outputs_and_the_budget_with_prefixes_and_adapters(hf, adapters) -> None:
    probe = make_engine(hf, "infinite")
    serve(probe, calls(adapters, rounds=1))
    sizes = {"adapter": 0, "prefix_kv": 0}
    for o in probe.memory.objects.values():
        sizes[o.kind] += o.nbytes // len(PERSONAS)  # one agent's share
    probe.memory.close()
    # Room for two agents' adapter and prefix at once: four agents must take turns.
    budget = 2 * (sizes["adapter"] + sizes["prefix_kv"]) + sizes["prefix_kv"] // 2
    texts = {}
    for policy in ("infinite", "lru", "scalesim", "none"):
        eng = make_engine(hf, policy, device_bytes=budget,
                          host_bytes=0 if policy == "lru" else None)
        manager = eng.memory
        rows = []
        manager.listeners.append(rows.append)

        def check() -> None:
            manager.check()
            if policy != "infinite":
                assert device_bytes_in_use(eng) <= budget

        texts[policy] = [c.text for c in serve(eng, calls(adapters, rounds=3), check)]
        moved = {(r.kind, r.op) for r in rows}
        if policy == "infinite":
            assert not any(op in ("evict", "drop") for _, op in moved)
        elif policy != "none":  # `none` caches no prefix KV at all
            assert moved & {("prefix_kv", "evict"), ("prefix_kv", "drop")}, policy
            assert moved & {("adapter", "evict"), ("adapter", "drop")}, policy
        if policy == "lru":
            assert eng.executor.reprefill_tokens > 0, policy
        if policy == "none":  # nothing kept between calls: nothing reused
            assert eng.executor.reprefill_tokens == 0 and not eng.executor.prefixes.segments()
        manager.close()
    assert texts["lru"] == texts["infinite"] == texts["scalesim"] == texts["none"]
    assert len(set(texts["infinite"])) > 1


def test_the_store_keeps_int8_and_float_kv_apart(hf, tmp_path) -> None:
    """A persona's KV stored by a float32 pool is not what an int8 pool reads (other bytes,
    another row size): the store's identity names the KV format, so the int8 engine computes
    its own and stores it beside."""
    store = tmp_path / "store"
    found = {}
    for kv in ("auto", "int8", "int8"):
        eng = make_engine(hf, "lru", device_bytes=10**9, host_bytes=0, kv_store=store,
                          kv_cache_dtype=kv)
        rows: list[MemoryEvent] = []
        eng.memory.listeners.append(rows.append)
        serve(eng, calls(None, rounds=1)[:1])
        found.setdefault(kv, []).append(sum(r.op == "found" for r in rows))
        eng.memory.reclaim(10 ** 12, kind="prefix_kv")
        eng.close()
    assert found == {"auto": [0], "int8": [0, found["int8"][1]]} and found["int8"][1] > 0


def test_persona_kv_outlives_the_engine_in_the_persistent_store(hf, adapters, tmp_path) -> None:
    reference = make_engine(hf, "infinite")
    want = [c.text for c in serve(reference, calls(adapters))]
    reference.memory.close()
    store = tmp_path / "store"
    budget = 10 ** 9
    runs = []
    for policy in ("lru", "lru", "infinite"):
        eng = make_engine(hf, policy, device_bytes=budget, host_bytes=0, kv_store=store)
        rows: list[MemoryEvent] = []
        eng.memory.listeners.append(rows.append)
        got = []
        for r in calls(adapters):
            got += serve(eng, [r])
            eng.memory.reclaim(10 ** 12, kind="prefix_kv")  # every persona leaves the device
        assert [c.text for c in got] == want
        summary = eng.report()["memory"]
        eng.memory.check()
        eng.close()
        runs.append((eng, rows, got, summary))
    (first, rows1, got1, s1), (second, rows2, got2, s2), (bound, rows3, _, _) = runs
    # Run 1 computes each persona once; its evictions go to the store, and later calls read it.
    assert first.executor.reprefill_tokens == 0
    assert s1["tiers"]["disk"]["written_bytes"] > 0 and s1["kv_store"]["entries_written"] >= 4
    # Run 2 computes none: every persona is found in the store and read from disk.
    assert not [r for r in rows2 if r.kind == "prefix_kv" and r.op == "recompute"]
    personas = {prefix_object(second, f"agent{i}").key for i in range(len(PERSONAS))}
    assert {r.object for r in rows2 if r.op == "found"} >= personas
    assert all(c.cached_tokens > 0 for c in got2)
    assert s2["tiers"]["disk"]["read_bytes"] >= 8 * prefix_object(second, "agent0").nbytes // 2
    # The infinite bound starts with every persona resident, read from the store.
    assert sum(r.op == "preload" and r.tier_from == "disk" and r.kind == "prefix_kv"
               for r in rows3) == 4
    assert not [r for r in rows3 if r.op == "recompute"]  # (reclaim forces reloads)


def test_growing_histories_give_the_same_outputs_with_and_without_the_cache(hf) -> None:
    """Greedy float32: three agents that share house rules send their growing conversations;
    the token-level cache (unbounded, and under a budget that drops segments) changes nothing
    in the outputs, and reuses most of the prompt tokens."""
    rules = ("House rules: speak one short sentence at a time, stay courteous, and talk about "
             "books, music or the weather. ")

    def conversation(eng: Engine) -> list:
        history: dict[int, list[dict[str, str]]] = {i: [] for i in range(3)}
        out = []
        for turn in range(3):
            for i in range(3):
                request = Request(f"agent{i}", f"Turn {turn}: what do you say next?",
                                  prefix=rules + PERSONAS[i], history=tuple(history[i]),
                                  sampling=SamplingParams(max_tokens=6))
                (done,) = serve(eng, [request])
                history[i] += [{"role": "user", "content": request.prompt},
                               {"role": "assistant", "content": done.text}]
                out.append(done)
        return out

    runs = {}
    for name, policy, memory in (("none", "none", {}), ("unbounded", "unlimited", {}),
                                 ("budget", "lru", {"device_bytes": 40 * 2**20,
                                                    "host_bytes": 0})):
        eng = make_engine(hf, policy, **memory)
        runs[name] = conversation(eng)
        eng.memory.check()
        eng.executor.prefixes.check()
        eng.memory.close()
    texts = {name: [c.text for c in done] for name, done in runs.items()}
    assert texts["none"] == texts["unbounded"] == texts["budget"]
    assert all(c.cached_tokens == 0 for c in runs["none"])
    prompt = sum(c.prompt_tokens for c in runs["unbounded"])
    assert sum(c.cached_tokens for c in runs["unbounded"]) > 0.6 * prompt
    assert sum(c.cached_tokens for c in runs["budget"]) > 0
