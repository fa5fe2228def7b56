"""Batched LoRA: adapter files, pool slots and the mixed decode/prefill application (no real model)."""

from __future__ import annotations

import pytest
import torch

from experiments.make_adapters import make_adapters
from runtime.lora import LoraBatch, LoraPool, load_adapter
from runtime.model.profiles import profile
from runtime.request import RequestError

TINY = profile("smollm2-135m", num_layers=2, hidden_size=32, intermediate_size=48, num_heads=4,
               num_kv_heads=2, head_dim=8, vocab_size=64)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-adapters")
    return make_adapters(out, TINY, n=5, rank=4, b_std=0.5) + make_adapters(
        out / "r2", TINY, n=1, rank=2, seed=9, b_std=0.5)


def reference(adapter, layer, module, x):
    a, b = adapter.weights[layer, module]
    return x @ a @ b


def test_mixed_batch_applies_each_tokens_own_adapter(paths):
    pool = LoraPool(TINY, max_rank=4, dtype=torch.float32, device="cpu", slots=2)
    adapters = [pool.get(p)[0] for p in paths]  # 6 adapters: the pool grows past 2 slots
    assert pool.num_slots >= 6 and len({a.slot for a in adapters}) == 6
    # Sequences: decode (a0), prefill of 4 (a1), decode (base model), decode (rank-2 a5),
    # prefill of 3 (a0 again), decode (a3).
    q_lens = [1, 4, 1, 1, 3, 1]
    owners = [adapters[0], adapters[1], None, adapters[5], adapters[0], adapters[3]]
    batch = LoraBatch.plan(pool, q_lens, [a.slot if a else None for a in owners])
    x = torch.randn(sum(q_lens), TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    for module in ("q_proj", "gate_proj"):
        out = torch.zeros(x.shape[0], pool.shapes[module][1])
        batch.apply(1, module, x, out)
        start = 0
        for n, owner in zip(q_lens, owners):
            rows = slice(start, start + n)
            expected = (torch.zeros_like(out[rows]) if owner is None
                        else reference(owner, 1, module, x[rows]))
            assert torch.allclose(out[rows], expected, atol=1e-5)
            start += n


def test_decodes_sharing_an_adapter_in_a_sparse_pool(paths):
    # Two decodes of one adapter stack in its slot; two used slots out of many are copied out.
    pool = LoraPool(TINY, max_rank=4, dtype=torch.float32, device="cpu", slots=2)
    adapters = [pool.get(p)[0] for p in paths]
    last = adapters[-1]
    q_lens, owners = [1, 1, 2, 1], [last, adapters[0], last, last]
    batch = LoraBatch.plan(pool, q_lens, [a.slot for a in owners])
    assert batch.bmm_gather is not None and batch.bmm_depth == 2
    x = torch.randn(sum(q_lens), TINY.intermediate_size, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(x.shape[0], pool.shapes["down_proj"][1])
    batch.apply(0, "down_proj", x, out)
    expected = torch.cat([reference(last, 0, "down_proj", x[0:1]),
                          reference(adapters[0], 0, "down_proj", x[1:2]),
                          reference(last, 0, "down_proj", x[2:4]),
                          reference(last, 0, "down_proj", x[4:5])])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_group_applies_each_modules_own_adapter_from_one_shrink(paths, sparse):
    # q/k/v share one A tensor per layer; each module's delta must still be its own x @ A @ B,
    # for decodes read from the pool in place and from slots copied out of a sparse pool, and
    # for prefill segments.
    pool = LoraPool(TINY, max_rank=4, dtype=torch.float32, device="cpu", slots=2)
    adapters = [pool.get(p)[0] for p in paths]
    if sparse:  # two used slots of eight: the plan copies them out
        q_lens, owners = [1, 3, 1], [adapters[5], adapters[5], adapters[0]]
    else:
        q_lens, owners = [1, 1, 5, 1], [adapters[2], adapters[5], adapters[1], adapters[0]]
    batch = LoraBatch.plan(pool, q_lens, [a.slot for a in owners])
    assert (batch.bmm_gather is not None) == sparse
    x = torch.randn(sum(q_lens), TINY.hidden_size, generator=torch.Generator().manual_seed(2))
    q, kv = TINY.q_size, TINY.kv_size
    qkv = torch.zeros(x.shape[0], q + 2 * kv)
    batch.apply_group(1, "qkv", x, [qkv[:, :q], qkv[:, q:q + kv], qkv[:, q + kv:]])
    start = 0
    for n, owner in zip(q_lens, owners):
        rows = slice(start, start + n)
        expected = torch.cat([reference(owner, 1, m, x[rows])
                              for m in ("q_proj", "k_proj", "v_proj")], dim=1)
        assert torch.allclose(qkv[rows], expected, atol=1e-5)
        start += n


def test_a_reused_slot_keeps_nothing_of_its_previous_owner(paths):
    # The rank-2 adapter takes the slot a rank-4 one left: ranks 3-4 must read as zeros.
    pool = LoraPool(TINY, max_rank=4, dtype=torch.float32, device="cpu", slots=1)
    full, _ = pool.get(paths[0])
    pool.offload(full)
    small, _ = pool.get(paths[5])
    assert small.rank == 2 and small.slot == 0
    for key in pool.a:
        assert not pool.a[key][0, :, 2:].any() and not pool.b[key][0, 2:].any()
    batch = LoraBatch.plan(pool, [1], [0])
    x = torch.randn(1, TINY.hidden_size, generator=torch.Generator().manual_seed(3))
    out = torch.zeros(1, pool.shapes["up_proj"][1])
    batch.apply(0, "up_proj", x, out)
    assert torch.allclose(out, reference(small, 0, "up_proj", x), atol=1e-5)


def test_offload_and_reload_restore_the_same_slot_contents(paths):
    pool = LoraPool(TINY, max_rank=4, dtype=torch.float32, device="cpu")
    first, _ = pool.get(paths[0])
    before = pool.a[0, "v_proj"][first.slot].clone()
    pool.offload(first)
    assert not first.resident
    other, _ = pool.get(paths[1])  # takes the freed slot
    again, was_resident = pool.get(paths[0])
    assert again is first and not was_resident
    after = pool.a[0, "v_proj"][first.slot]
    assert torch.equal(before, after) and first.slot != other.slot
    assert first.nbytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in first.weights.values())


def test_adapter_validation_errors_name_the_problem(paths, tmp_path):
    with pytest.raises(RequestError, match="rank 4 exceeds the engine's max_lora_rank 2"):
        load_adapter(paths[0], TINY, max_rank=2)
    with pytest.raises(RequestError, match="another model"):
        load_adapter(paths[0], profile("smollm2-135m", num_layers=1, hidden_size=32,
                                       intermediate_size=48, num_heads=4, num_kv_heads=2,
                                       head_dim=8), max_rank=8)
    with pytest.raises(RequestError, match="expected"):
        load_adapter(paths[0], profile("smollm2-135m", num_layers=2), max_rank=8)
    with pytest.raises(RequestError, match="no adapter_config.json"):
        load_adapter(str(tmp_path), TINY, max_rank=8)


def test_adapters_load_with_peft(paths):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    c = TINY
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, paths[0]).eval()(ids).logits
    assert not torch.allclose(plain, adapted)
