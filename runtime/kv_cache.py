"""The paged KV pool: fixed-size blocks of keys and values, and who owns which block.

Keys and values of every layer live in two preallocated tensors of shape
``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` (per layer, the ``NHD`` paged
layout that flashinfer reads directly). A sequence owns a *block table*, the list of block ids that
hold its tokens in order; token ``p`` sits in block ``table[p // block_size]`` at offset
``p % block_size``. Blocks are reference counted so that a cached prefix and the sequences that
reuse it can share the same full blocks.
"""

from __future__ import annotations

from collections import deque
from math import prod

import numpy as np
import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class KVCache:
    """Preallocated paged K/V tensors with a reference-counted block allocator."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, torch.device(device))
        self.v = _zeros(shape, dtype, torch.device(device))
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
