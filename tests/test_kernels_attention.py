"""The compiled paged-attention kernel against a float64 softmax over the gathered keys.

float32 pools take the plain loops; bfloat16 pools with head dimensions of 32k take, on a CPU
with AVX512-BF16, the 16-keys-at-a-time dot products. Both are checked over block sizes that
split those 16 keys differently, partial last blocks, and chunk rows with growing key counts.
"""

from __future__ import annotations

import pytest
import torch

from runtime.model.kernels import cpu_op

KERNEL = cpu_op("paged_attention")


def reference(q, k_pool, v_pool, tables, row_seq, row_keys, scale):
    """Row by row: gather the row's keys through its block table, softmax in float64."""
    rows, heads, d = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(rows, heads, d, dtype=torch.float64)
    for r in range(rows):
        n = int(row_keys[r])
        blocks = tables[int(row_seq[r])][: -(-n // block_size)].long()
        k = k_pool[blocks].reshape(-1, kv_heads, d)[:n].double()
        v = v_pool[blocks].reshape(-1, kv_heads, d)[:n].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[r].double(), k) * scale, dim=-1)
        out[r] = torch.einsum("hn,nhd->hd", weights, v)
    return out.reshape(rows, heads * d)


@pytest.mark.skipif(KERNEL is None, reason="the compiled kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 48])
@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_paged_attention_matches_a_float64_softmax(dtype, d, block_size):
    gen = torch.Generator().manual_seed(d + block_size)
    heads, kv_heads, blocks = 9, 3, 64
    k_pool = torch.randn(blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_pool = torch.randn(blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    width = 20
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in range(3)])
    # A long decode, a short one, and the rows of a 3-token chunk (growing key counts).
    lengths = [min(width * block_size, 300), 5, 37, 38, 39]
    row_seq = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    row_keys = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(5, heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    got = KERNEL(q, k_pool, v_pool, tables.int(), row_seq, row_keys, scale)
    ref = reference(q, k_pool, v_pool, tables, row_seq, row_keys, scale)
    # float32: summation order; bfloat16: the output's rounding (2^-8 of values of order 1).
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.shape == ref.shape and got.dtype == dtype
    assert (got.double() - ref).abs().max() < tolerance, (got.double() - ref).abs().max()
