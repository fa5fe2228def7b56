"""The paged KV pool: fixed-size blocks of keys and values, and who owns which block.

Keys and values of every layer live in two preallocated tensors of shape
``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` (per layer, the ``NHD`` paged
layout that flashinfer reads directly). A sequence owns a *block table*, the list of block ids that
hold its tokens in order; token ``p`` sits in block ``table[p // block_size]`` at offset
``p % block_size``. Blocks are reference counted so that a cached prefix and the sequences that
reuse it can share the same full blocks.

An *int8* pool (``quantized=True``) keeps each token's key (and value) of each KV head as one
row of ``head_dim + 4`` bytes: ``head_dim`` signed 8-bit codes, then the row's float32 scale
(``x ~ code * scale``, ``scale = max|x| / 127``), about half the bytes of bfloat16 (68 against
128 at ``head_dim`` 64). Decode attention reads every cached key and value once per step, so
its time is these bytes; keeping the scale inside the row keeps a block one contiguous run of
bytes, which the copies between tiers, the persistent store and reference counting handle like
any other pool.
"""

from __future__ import annotations

from collections import deque
from math import prod
from typing import Callable

import numpy as np
import torch

#: bytes a quantized row carries beyond its codes (its float32 scale)
SCALE_BYTES = 4

#: ``runtime.kv_cache_dtype``: the model's dtype (auto) or int8 rows
KV_CACHE_DTYPES = ("auto", "int8")


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` (one line, naming the setting) when ``kv_cache_dtype`` cannot run."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"runtime.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    if kv_cache_dtype == "int8" and device.type != "cpu":
        raise ValueError(f"runtime.kv_cache_dtype int8 runs on the CPU only (its attention "
                         f"kernel is the engine's own), not on {device.type}")
    if kv_cache_dtype == "int8" and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"runtime.kv_cache_dtype int8 needs runtime.dtype float32 or bfloat16, "
                         f"got {dtype}")


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class KVCache:
    """Preallocated paged K/V tensors with a reference-counted block allocator."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", quantized: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        #: int8 rows with their scale (see the module docstring); ``dtype`` is then what
        #: :meth:`gather` returns
        self.quantized = quantized
        self.head_dim = head_dim
        self.dtype = dtype
        row = head_dim + SCALE_BYTES if quantized else head_dim
        shape = (num_layers, num_blocks, block_size, num_kv_heads, row)
        store = torch.int8 if quantized else dtype
        self.k = _zeros(shape, store, torch.device(device))
        self.v = _zeros(shape, store, torch.device(device))
        #: the compiled quantizing write and dequantizing gather (None: torch's), see
        #: :meth:`write_tokens` and :meth:`gather`
        self._quantize_write: Callable[..., object] | None = None
        self._dequantize: Callable[..., torch.Tensor] | None = None
        if quantized and self.k.device.type == "cpu":
            from runtime.model.kernels import cpu_op

            self._quantize_write = cpu_op("kv_quantize_write")
            self._dequantize = cpu_op("kv_dequantize")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def block_nbytes(self) -> int:
        """Bytes of K and V one block holds across all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        # allocate, share and release run for every block of every call (the pool and the
        # prefix cache hand blocks around): they read the tables once, not once per block.
        take, refs = self._free.popleft, self._refs
        blocks = [take() for _ in range(n)]
        for b in blocks:
            refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Take one more reference on ``blocks`` (they are now also someone else's)."""
        refs = self._refs
        for b in blocks:
            refs[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block; blocks nobody references return to the pool."""
        refs, free = self._refs, self._free
        for b in blocks:
            left = refs[b] - 1
            refs[b] = left
            if not left:
                free.append(b)

    def refs(self, block: int) -> int:
        """How many holders ``block`` has (0: free)."""
        return self._refs[block]

    def write_tokens(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Store new keys and values ``[tokens, kv_heads, head_dim]`` of ``layer`` at the flat
        pool ``slots`` (``block * block_size + offset``), quantizing them for an int8 pool."""
        kp, vp = self.k[layer], self.v[layer]
        heads, row = kp.shape[-2], kp.shape[-1]
        if not self.quantized:
            kp.view(-1, heads, row).index_copy_(0, slots, k)
            vp.view(-1, heads, row).index_copy_(0, slots, v)
        elif self._quantize_write is not None:
            self._quantize_write(kp, vp, slots, k, v)
        else:
            kp.view(-1, heads, row).index_copy_(0, slots, quantize_rows(k))
            vp.view(-1, heads, row).index_copy_(0, slots, quantize_rows(v))

    def gather(self, pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The keys (or values) of one layer's ``pool`` (``self.k[layer]`` or ``self.v[layer]``)
        in ``blocks``, in order: ``[len(blocks) * block_size, kv_heads, head_dim]`` of
        :attr:`dtype`, an int8 pool's rows dequantized."""
        if self._dequantize is not None:
            return self._dequantize(pool, blocks, self.dtype)
        # index_select over whole blocks is a row memcpy; advanced indexing is several times
        # slower on CPU for the same gather.
        rows = pool.view(pool.shape[0], -1).index_select(0, blocks)
        rows = rows.view(-1, pool.shape[-2], pool.shape[-1])
        return dequantize_rows(rows, self.head_dim).to(self.dtype) if self.quantized else rows

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def read(self, blocks: list[int], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the K/V of ``blocks`` out of the pool (e.g. to host memory)."""
        idx = torch.tensor(blocks, device=self.k.device, dtype=torch.long)
        return self.k[:, idx].to(device, copy=True), self.v[:, idx].to(device, copy=True)

    def write(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy K/V produced by :meth:`read` back into ``blocks``."""
        idx = torch.tensor(blocks, device=self.k.device, dtype=torch.long)
        self.k[:, idx] = k.to(self.k.device)
        self.v[:, idx] = v.to(self.v.device)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` as int8 rows ``[..., d + 4]``: the codes ``round(x / scale)`` with
    ``scale = max|x| / 127`` per row, then the scale's float32 bytes (the torch form of the
    compiled ``kv_quantize_write``, which may divide by way of a reciprocal: its scales agree
    to the last bit of a division, its codes within one)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    codes = torch.where(scale > 0, xf / scale, torch.zeros_like(xf)).round_().clamp_(-127, 127)
    return torch.cat([codes.to(torch.int8), scale.view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """int8 rows ``[..., head_dim + 4]`` back to float32 ``[..., head_dim]``."""
    scale = rows[..., head_dim:].contiguous().view(torch.float32)
    return rows[..., :head_dim].float() * scale


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed pool tensor. On the CPU its memory comes from calloc (numpy's zeros), whose
    large allocations are fresh pages the kernel zeroes on first touch: a pool of a few GB
    costs neither start-up time (torch.zeros writes every byte, about a second per GB) nor
    memory until its blocks are used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = prod(shape) * dtype.itemsize
    memory = torch.from_numpy(np.zeros(nbytes + 64, dtype=np.uint8))
    start = -memory.data_ptr() % 64  # a cache-line boundary, as torch's own allocations
    return memory[start:start + nbytes].view(dtype).view(shape)
