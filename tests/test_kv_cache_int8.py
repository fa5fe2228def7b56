"""The int8 KV pool (``runtime.kv_cache_dtype: int8``): rows of codes and a scale, written by the
compiled kernel or torch, read by the compiled attention and by the gathering reference.

The kernel is checked against a float64 softmax over the dequantized pool (so only summation
order differs), the quantization against the rows it came from (half a step of the row's scale),
the pool's byte-level operations (copies between tiers, the store) for bit-identical round
trips, and the engine end to end: greedy replies over an int8 pool against the model's own
dtype, and prefix reuse over the int8 pool against recomputing.
"""

from __future__ import annotations

import pytest
import torch

from runtime.kv_cache import KVCache, check_kv_cache_dtype, dequantize_rows, quantize_rows
from runtime.model.attention import CpuPagedAttention, TorchPagedAttention, BatchLayout
from runtime.model.kernels import cpu_op

from tests.test_kernels_attention import reference

KERNEL = cpu_op("paged_attention")
WRITE = cpu_op("kv_quantize_write")
needs_kernels = pytest.mark.skipif(KERNEL is None or WRITE is None,
                                   reason="the compiled kernels did not build")


def test_quantized_rows_are_within_half_a_step_of_their_scale():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, 64, generator=gen) * torch.rand(50, 3, 1, generator=gen) * 10
    x[0, 0] = 0.0  # an all-zero row keeps scale 0 and decodes to zeros
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 68)
    back = dequantize_rows(rows, 64)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((back - x).abs() <= scale / 2 + 1e-6)
    assert torch.equal(back[0, 0], torch.zeros(64))
    assert rows[..., :64].abs().max() == 127  # every nonzero row uses the full range


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_write_stores_what_torch_computes(dtype):
    gen = torch.Generator().manual_seed(2)
    cache = KVCache(2, 8, 4, 3, 64, dtype=dtype, quantized=True)
    k = torch.randn(5, 3, 64, generator=gen).to(dtype)
    v = torch.randn(5, 3, 64, generator=gen).to(dtype)
    slots = torch.tensor([31, 0, 7, 12, 13])
    cache.write_tokens(1, slots, k, v)
    for pool, x in ((cache.k[1], k), (cache.v[1], v)):
        got = pool.view(-1, 3, 68)[slots]
        want = quantize_rows(x)
        # Scales and codes equal up to the last bit of a division (compiled with fast math, the
        # kernel may multiply by a reciprocal instead).
        got_scale = got[..., 64:].contiguous().view(torch.float32)
        want_scale = want[..., 64:].contiguous().view(torch.float32)
        torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0)
        assert (got[..., :64].int() - want[..., :64].int()).abs().max() <= 1
    untouched = torch.ones(8 * 4, dtype=torch.bool)
    untouched[slots] = False
    assert not cache.k[1].view(-1, 3, 68)[untouched].any() and not cache.k[0].any()


def test_block_copies_and_reads_round_trip_bit_identically():
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(2, 6, 4, 2, 32, dtype=torch.bfloat16, quantized=True)
    assert cache.block_nbytes == 2 * 2 * 4 * 2 * 36  # k and v, layers, tokens, heads, row
    slots = torch.arange(8)  # blocks 0 and 1
    cache.write_tokens(0, slots, torch.randn(8, 2, 32, generator=gen).bfloat16(),
                       torch.randn(8, 2, 32, generator=gen).bfloat16())
    k, v = cache.read([0, 1])
    cache.write([4, 5], k, v)
    cache.copy_block(0, 3)
    assert torch.equal(cache.k[:, 4], cache.k[:, 0]) and torch.equal(cache.v[:, 5], cache.v[:, 1])
    assert torch.equal(cache.k[:, 3], cache.k[:, 0])


def _pools(dtype, d, block_size, blocks=48, kv_heads=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(1, blocks, block_size, kv_heads, d, dtype=dtype, quantized=True)
    slots = torch.arange(blocks * block_size)
    # Rows of uneven magnitude, so that per-row scales matter.
    magnitude = torch.rand(len(slots), kv_heads, 1, generator=gen) * 4
    k = (torch.randn(len(slots), kv_heads, d, generator=gen) * magnitude).to(dtype)
    v = (torch.randn(len(slots), kv_heads, d, generator=gen) * magnitude).to(dtype)
    cache.write_tokens(0, slots, k, v)
    return cache, gen


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 48])
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_over_an_int8_pool_matches_a_float64_softmax_of_its_rows(dtype, d, block_size):
    cache, gen = _pools(dtype, d, block_size, seed=d + block_size)
    heads, width = 9, 12
    tables = torch.stack([torch.randperm(48, generator=gen)[:width] for _ in range(3)]).int()
    lengths = [width * block_size, 5, 17, 18, 19]
    row_seq = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    row_keys = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(5, heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    got = KERNEL(q, cache.k[0], cache.v[0], tables, row_seq, row_keys, scale)
    k_float = dequantize_rows(cache.k[0], d)
    v_float = dequantize_rows(cache.v[0], d)
    ref = reference(q, k_float, v_float, tables, row_seq, row_keys, scale)
    # float32: summation order; bfloat16: the output's rounding, half a unit in the last place
    # (2^-9 relative), values here reach ~10.
    tolerance = 1e-5 + (2 ** -8 * ref.abs() if dtype == torch.bfloat16 else 0)
    assert got.dtype == dtype and torch.all((got.double() - ref).abs() <= tolerance)


@needs_kernels
def test_the_gathering_reference_and_the_kernel_agree_over_an_int8_pool():
    cache, gen = _pools(torch.float32, 64, 4)
    heads = 6
    layout = BatchLayout(q_lens=[1, 3, 40], starts=[30, 9, 50],
                         block_tables=[list(range(0, 10)), list(range(10, 20)),
                                       list(range(20, 48))])
    q = torch.randn(44, heads, 64, generator=gen)
    k = torch.randn(44, 3, 64, generator=gen)
    v = torch.randn(44, 3, 64, generator=gen)
    outs = []
    for attention in (TorchPagedAttention(cache, heads, 3, 64),
                      CpuPagedAttention(cache, heads, 3, 64, KERNEL)):
        attention.plan(layout)
        outs.append(attention.forward(0, q, k, v))
    assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_bad_kv_cache_dtype_settings_fail_with_the_setting_named():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="runtime.kv_cache_dtype must be one of auto, int8"):
        check_kv_cache_dtype("fp8", cpu, torch.float32)
    with pytest.raises(ValueError, match="CPU only"):
        check_kv_cache_dtype("int8", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        check_kv_cache_dtype("int8", cpu, torch.float16)

    from pydantic import ValidationError

    from scalesim.config import RuntimeConfig

    with pytest.raises(ValidationError, match="kv_cache_dtype int8 needs executor torch"):
        RuntimeConfig(executor="modeled", kv_cache_dtype="int8")
    with pytest.raises(ValidationError, match="needs device cpu"):
        RuntimeConfig(executor="torch", kv_cache_dtype="int8", device="cuda")
    assert RuntimeConfig(executor="torch", kv_cache_dtype="int8").engine_options()[
        "kv_cache_dtype"] == "int8"
    RuntimeConfig(executor="torch", kv_cache_dtype="int8", device="cpu:0")  # a CPU by index


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_gather_dequantizes_as_torch_does(dtype):
    cache, gen = _pools(dtype, 64, 4)
    blocks = torch.tensor([7, 0, 47, 3])
    compiled = cache.gather(cache.v[0], blocks)
    cache._dequantize = None  # the torch path
    plain = cache.gather(cache.v[0], blocks)
    assert compiled.shape == plain.shape == (16, 3, 64) and compiled.dtype == plain.dtype == dtype
    torch.testing.assert_close(compiled, plain, rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-6,
                               atol=0)
    rows = cache.v[0].view(-1, 3, 68)[torch.cat([torch.arange(b * 4, b * 4 + 4) for b in blocks])]
    torch.testing.assert_close(plain, dequantize_rows(rows, 64).to(dtype))
