"""The engine's device paths, each checked against an independent reference, on the CPU and CUDA.

Every test is parametrized over devices: ``cpu`` always runs (CI; tiny shapes, random weights, no
real model), ``cuda`` is marked ``cuda`` and skipped where no CUDA device is. flashinfer variants
exist only for ``cuda`` and skip where flashinfer does not import. To run only the CUDA variants::

    python -m pytest -q -m cuda tests/test_cuda.py

1. the paged forward pass (chunks, then decodes, through a scrambled block table) against
   transformers on tiny random Llama-3 and Qwen2 models, float32 and bfloat16;
2. paged attention on a ragged mixed batch (fresh prefills, chunks over cached context, decodes)
   against a naive per-sequence causal softmax written here: the torch reference everywhere,
   flashinfer on CUDA;
3. multi-LoRA (each sequence its own adapter, decodes and chunks in one batch) against peft;
4. an object offloaded to the host tier (pinned on CUDA) and loaded back through the copy engine
   is bit-identical.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from runtime.kv_cache import KVCache
from runtime.lora import LoraBatch, LoraPool
from runtime.memory import MemoryEvent, MemoryManager, TensorMemory
from runtime.memory.copy_engine import CopyEngine
from runtime.model.attention import BatchLayout, FlashInferAttention, TorchPagedAttention
from runtime.model.llama import LlamaModel
from runtime.model.profiles import from_hf_config
from tests.model_fixtures import paged_logits, tiny_hf

HAS_CUDA = torch.cuda.is_available()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def on(device: str, *values: Any, id: str) -> Any:
    """One parameter set on ``device`` (the CUDA marks when it is ``cuda``)."""
    return pytest.param(device, *values, marks=CUDA_MARKS if device == "cuda" else [],
                        id=f"{device}-{id}")


@pytest.fixture(autouse=True)
def ieee_float32():
    """float32 matrix products in full precision (no TF32 on CUDA), so float32 stays tight."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def need_flashinfer(backend: str) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")


# -- 1. the paged forward pass against transformers ------------------------------------------

FORWARD = [on(device, dtype, "torch", id=f"{str(dtype)[6:]}-torch")
           for device in ("cpu", "cuda") for dtype in (torch.float32, torch.bfloat16)]
# flashinfer has no float32 kernels: bfloat16 only.
FORWARD.append(on("cuda", torch.bfloat16, "flashinfer", id="bfloat16-flashinfer"))


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
@pytest.mark.parametrize("device,dtype,backend", FORWARD)
def test_paged_forward_matches_transformers(kind, device, dtype, backend):
    """A 40-token prompt in chunks of 17 and 9 (crossing 16-token blocks), two decodes, then a
    12-token chunk over cached context, through a scrambled block table; every position's logits
    against transformers' float32 forward of the whole sequence on the same weights."""
    need_flashinfer(backend)
    # head_dim 64 (256 / 4 heads; GQA 4/2): a size flashinfer has kernels for.
    hf = tiny_hf(kind, hidden_size=256, num_heads=4, num_kv_heads=2).to(device)
    config = from_hf_config(hf.config)
    model = LlamaModel.from_hf(hf, config, dtype=dtype)
    assert model.device.type == device and model.dtype == dtype
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device=device)).logits[0].float()
    got = paged_logits(model, ids, [17, 9, 1, 1, 12], block_size=16, table=[41, 5, 23],
                       backend=backend)
    assert got.shape == ref.shape and got.device.type == device
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        # The same arithmetic in another order: rounding only (measured ~1e-6 on the CPU).
        assert err < 1e-4, err
        return
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%) and every projection, norm
    # and attention output is rounded to it, over two layers: a few steps of the largest logit,
    # measured ~0.6% on the CPU. 3% of the logit range still fails any real mistake (a wrong
    # block, position or head gives errors of the order of the logits themselves).
    assert err < 3e-2 * scale, (err, scale)
    # The same token wherever transformers' choice is clear of the rounding (margin > 2 x err).
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert clear.sum() >= 5, "too few rows with a clear winner to check argmax"
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


# -- 2. paged attention on a ragged mixed batch against a naive softmax ----------------------

#: (start, new tokens) per sequence: fresh prefills (start 0), chunks over cached context
#: (aligned and not), decodes at a block start, filling a block and short, a one-token prefill.
RAGGED = [(0, 37), (32, 1), (20, 13), (47, 1), (16, 16), (0, 1), (5, 1), (63, 5)]
BLOCK = 16
HEADS, KV_HEADS = 8, 2

ATTENTION = [on(device, dtype, d, "torch", id=f"{str(dtype)[6:]}-d{d}-torch")
             for device in ("cpu", "cuda") for dtype in (torch.bfloat16, torch.float16)
             for d in (64, 128)]
ATTENTION += [on("cuda", dtype, d, "flashinfer", id=f"{str(dtype)[6:]}-d{d}-flashinfer")
              for dtype in (torch.bfloat16, torch.float16) for d in (64, 128)]


def naive_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    seqs: list[tuple[int, int]]) -> torch.Tensor:
    """Causal softmax attention per sequence in float32: query ``j`` of a sequence starting at
    ``start`` sees keys ``0 .. start + j``; query head ``i`` reads KV head ``i // group``."""
    heads, d = q.shape[1], q.shape[2]
    out, t = [], 0
    for (start, n), k, v in zip(seqs, keys, values):
        group = heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # [ctx, heads, d]
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[t:t + n].float(), k) / math.sqrt(d)
        q_pos = torch.arange(start, start + n, device=q.device)[:, None]
        k_pos = torch.arange(start + n, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d))
        t += n
    return torch.cat(out)


@pytest.mark.parametrize("device,dtype,head_dim,backend", ATTENTION)
def test_paged_attention_on_a_ragged_mixed_batch(device, dtype, head_dim, backend):
    need_flashinfer(backend)
    gen = torch.Generator().manual_seed(head_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    num_blocks = 48
    cache = KVCache(1, num_blocks, BLOCK, KV_HEADS, head_dim, dtype=dtype, device=device)
    # Garbage everywhere first, far off the real keys' scale and offset: any read past a
    # sequence's context or into another sequence's blocks shows as a large error.
    cache.k.copy_(randn(*cache.k.shape) * 8 + 4)
    cache.v.copy_(randn(*cache.v.shape) * 8 + 20)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scrambled, disjoint tables
    tables, keys, values, new_k, new_v = [], [], [], [], []
    for start, n in RAGGED:
        ctx = start + n
        table, order = order[:-(-ctx // BLOCK)], order[-(-ctx // BLOCK):]
        k, v = randn(ctx, KV_HEADS, head_dim), randn(ctx, KV_HEADS, head_dim)
        # The model's contract: the cached context and this step's new K/V are in the pool
        # before forward() (the new ones are also passed to it).
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)],
                             device=device)
        cache.k[0].view(-1, KV_HEADS, head_dim).index_copy_(0, slots, k)
        cache.v[0].view(-1, KV_HEADS, head_dim).index_copy_(0, slots, v)
        tables.append(table)
        keys.append(k)
        values.append(v)
        new_k.append(k[start:])
        new_v.append(v[start:])
    total = sum(n for _, n in RAGGED)
    # Queries as the model hands them over: a non-contiguous slice of the rotated q/k tensor.
    q = randn(total, HEADS + KV_HEADS, head_dim)[:, :HEADS]
    expected = naive_attention(q, keys, values, RAGGED)

    backend_cls = TorchPagedAttention if backend == "torch" else FlashInferAttention
    attention = backend_cls(cache, HEADS, KV_HEADS, head_dim)
    attention.plan(BatchLayout([n for _, n in RAGGED], [s for s, _ in RAGGED], tables))
    got = attention.forward(0, q, torch.cat(new_k), torch.cat(new_v))
    assert got.shape == (total, HEADS * head_dim) and got.dtype == dtype
    assert got.device.type == device
    # Outputs are averages of unit-scale values, rounded to the output dtype (bfloat16: 8
    # significant bits, a step of 0.4-0.8% near 1; float16: 11 bits, 0.05-0.1%); kernels may
    # also round the scores or the softmax weights to it on the way. Measured on the CPU
    # reference: bfloat16 ~8e-3, float16 ~1.3e-3. A leak of the garbage (offset 20) or a
    # wrong block, mask or head is off by O(1).
    atol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    err = (got.float() - expected).abs()
    assert err.max().item() < atol, [(i, err[t:t + n].max().item()) for i, (t, n) in
                                     enumerate(zip(_offsets(RAGGED), (n for _, n in RAGGED)))]


def _offsets(seqs: list[tuple[int, int]]) -> list[int]:
    out, t = [], 0
    for _, n in seqs:
        out.append(t)
        t += n
    return out


# -- 3. multi-LoRA against peft ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny random Llama (float32, CPU) and three PEFT adapters for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.make_adapters import make_adapters

    torch.manual_seed(3)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128)).eval()
    config = from_hf_config(base.config)
    paths = make_adapters(tmp_path_factory.mktemp("cuda-adapters"), config, n=3, rank=4,
                          b_std=0.5)
    return base, config, paths


@pytest.mark.parametrize("device", DEVICES)
def test_multi_lora_batch_matches_peft(lora_setup, device):
    """Two steps of five sequences, each with its own adapter (two share one, one has none):
    prefill chunks, then decodes of several adapters at once beside a continued chunk and a
    fresh prefill. Every row's logits against peft with that sequence's adapter active."""
    from peft import PeftModel

    base, config, paths = lora_setup
    base = copy.deepcopy(base).to(device)
    model = LlamaModel.from_hf(base, config)
    pool = LoraPool(config, max_rank=4, dtype=torch.float32, device=device, slots=2)
    slots = [pool.get(p)[0].slot for p in paths]  # three adapters: the pool grows past 2 slots
    assert pool.num_slots >= 3 and all(a.device.type == device for a in pool.a.values())

    gen = torch.Generator().manual_seed(4)
    lens = [9, 12, 7, 6, 8]
    adapter = [0, 1, None, 2, 0]
    seqs = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in lens]
    block = 4
    cache = KVCache(config.num_layers, 32, block, config.num_kv_heads, config.head_dim,
                    device=device)
    order = torch.randperm(32, generator=gen).tolist()
    tables = []
    for n in lens:
        tables.append(order[:-(-n // block)])
        order = order[-(-n // block):]
    attention = TorchPagedAttention(cache, config.num_heads, config.num_kv_heads, config.head_dim)

    def slot_of(i: int) -> int | None:
        a = adapter[i]
        return None if a is None else slots[a]

    def step(which: list[int], starts: list[int], q_lens: list[int]) -> list[torch.Tensor]:
        """One batch; every row's logits, split per sequence."""
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        for i, st, n in zip(which, starts, q_lens):
            ids += seqs[i][st:st + n]
            pos += range(st, st + n)
            slot_map += [tables[i][p // block] * block + p % block for p in range(st, st + n)]
        attention.plan(BatchLayout(q_lens, starts, [tables[i] for i in which]))
        lora = LoraBatch.plan(pool, q_lens, [slot_of(i) for i in which])
        assert lora is not None
        logits = model.forward(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                               torch.tensor(slot_map, device=device), cache, attention, lora,
                               torch.arange(len(ids), device=device))
        return list(logits.split(q_lens))

    # Step 1: prefill chunks of four sequences (each a segment against its own slot).
    first = [0, 1, 2, 4]
    first_lens = [8, 6, 6, 7]
    out1 = step(first, [0] * 4, first_lens)
    # Step 2: decodes of adapters 0, none and 0 again (two stack in one slot), a 6-token chunk
    # of adapter 1 over its cached context and a fresh 6-token prefill of adapter 2.
    second = [0, 1, 2, 3, 4]
    starts2 = [8, 6, 6, 0, 7]
    lens2 = [1, 6, 1, 6, 1]
    out2 = step(second, starts2, lens2)

    got: dict[int, list[tuple[int, int, torch.Tensor]]] = {i: [] for i in range(len(seqs))}
    for which, starts, q_lens, out in ((first, [0] * 4, first_lens, out1),
                                       (second, starts2, lens2, out2)):
        for i, st, n, rows in zip(which, starts, q_lens, out):
            got[i].append((st, n, rows))

    peft_models: dict[int, Any] = {}
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            a = adapter[i]
            x = torch.tensor([ids], device=device)
            plain = base(x).logits[0]
            if a is None:
                ref = plain
            else:
                if a not in peft_models:
                    peft_models[a] = PeftModel.from_pretrained(
                        copy.deepcopy(base).cpu(), paths[a]).to(device).eval()
                ref = peft_models[a](x).logits[0]
                # The adapter matters: a LoRA path that did nothing would fail below.
                assert (ref - plain).abs().max() > 1e-2
            for st, n, rows in got[i]:
                # float32 throughout, no TF32: rounding only (~1e-6 measured on the CPU).
                assert torch.allclose(rows, ref[st:st + n], atol=1e-4, rtol=1e-4), \
                    (i, st, n, (rows - ref[st:st + n]).abs().max().item())


# -- 4. host tier and copy engine: bit-identical reload ---------------------------------------

def _contents(seed: int) -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and odd sizes (chunk tails), with inf, -0.0 and NaN in them."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(1001, generator=g)
    f[:4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")])
    return {"f32": f, "bf16": torch.randn(3, 333, generator=g).to(torch.bfloat16),
            "i64": torch.randint(-2**62, 2**62, (77,), generator=g, dtype=torch.int64),
            "u8": torch.randint(0, 256, (513,), generator=g, dtype=torch.uint8)}


def _same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(
            got[k].detach().cpu().contiguous().view(torch.uint8),
            want[k].contiguous().view(torch.uint8)) for k in want)


@pytest.mark.parametrize("device", DEVICES)
def test_host_tier_reload_is_bit_identical(device):
    """Object ``a`` is loaded, evicted to the host tier by ``b`` (the device holds one), and
    loaded back from the host through the copy engine (1000-byte chunks: many, with tails)."""
    a = TensorMemory("obj-a", lambda: _contents(1), kind="adapter")
    b = TensorMemory("obj-b", lambda: _contents(2), kind="adapter")
    assert a.nbytes == b.nbytes
    mm = MemoryManager("lru", device_bytes=a.nbytes, host_bytes=None, device=device,
                       chunk_bytes=1000)
    events: list[MemoryEvent] = []
    mm.listeners.append(events.append)
    try:
        assert isinstance(mm.copy, CopyEngine)
        if device == "cuda":
            assert mm.copy.stream is not None  # loads are copied on the engine's own stream
        assert mm.acquire("first", [a]) is not None
        assert a.device is not None and _same_bits(a.device, _contents(1))
        assert all(t.device.type == device for t in a.device.values())
        mm.release("first")
        assert mm.acquire("second", [b]) is not None  # no room for both: a leaves the device
        assert a.device is None and a.host is not None and "obj-a" not in mm.resident
        assert _same_bits(a.host, _contents(1))
        for t in a.host.values():
            assert t.device.type == "cpu"
            # On CUDA the host tier is pinned memory, so the copy back can be asynchronous.
            assert t.is_pinned() == (device == "cuda")
        mm.release("second")
        stats = mm.acquire("third", [a])
        assert stats is not None and stats.misses == {"adapter": 1}
        assert a.device is not None and _same_bits(a.device, _contents(1))
        assert all(t.device.type == device for t in a.device.values())
        if device == "cuda":
            torch.cuda.synchronize()
            assert _same_bits(a.device, _contents(1))
        assert mm.copy.busy_s > 0
        mm.release("third")
        log = [(e.object, e.op, e.tier_from, e.tier_to) for e in events]
        assert ("obj-a", "evict", "device", "host") in log
        assert ("obj-a", "load", "host", "device") in log
        mm.check()
    finally:
        mm.close()
