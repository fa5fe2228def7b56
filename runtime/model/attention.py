"""Attention over the paged KV pool, behind one small interface.

Every backend is used the same way by the model: :meth:`plan` once per engine iteration with the
:class:`BatchLayout` (which sequences, how many new tokens each, where their blocks are), then
:meth:`forward` once per layer with that layer's new queries, after the model has written the new
keys and values into the pool. The queries of a step are ragged: sequence ``i`` contributes
``q_lens[i]`` consecutive tokens at positions ``starts[i] ..``.

:class:`TorchPagedAttention` is the reference (CPU and anywhere): decodes are batched into one
padded SDPA call over their gathered blocks, prefill chunks go through SDPA one sequence at a time.
Gathering copies every decode's keys and values on every layer and step, as many bytes again as
the attention itself reads. :class:`CpuPagedAttention` reads the pool in place instead: decodes
and short chunks, of all sequences at once, are query rows of one compiled kernel call
(:mod:`runtime.model.kernels`); long chunks, where a matrix-product SDPA pays, keep the reference
path. :class:`FlashInferAttention` uses flashinfer's paged prefill kernel for the whole ragged
batch on CUDA. :func:`select_attention` picks flashinfer only for a CUDA device where it imports,
so CPU runs never import it, and the in-place kernel on CPU where it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.kv_cache import KVCache


@dataclass
class BatchLayout:
    """Where the tokens of one iteration come from and where their KV lives."""

    q_lens: list[int]
    starts: list[int]
    block_tables: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)


class TorchPagedAttention:
    """Reference paged attention in plain torch."""

    def __init__(self, cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.cache = cache
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def plan(self, layout: BatchLayout) -> None:
        self._plan_gathered(layout, range(len(layout.q_lens)))

    def _plan_gathered(self, layout: BatchLayout, seqs: range | list[int]) -> None:
        """Plan the gathered path for the sequences ``seqs`` of ``layout`` (the others' rows are
        left to a subclass)."""
        device = self.cache.k.device
        bs = self.cache.block_size
        offsets = [0]
        for n in layout.q_lens:
            offsets.append(offsets[-1] + n)
        #: where each sequence's tokens start in the flat batch (and their total, last)
        self.offsets = offsets
        self.num_tokens = offsets[-1]
        decode = [i for i in seqs if layout.q_lens[i] == 1]
        self.decode_tokens: torch.Tensor | None = None
        if decode:
            decode_ctx = [layout.starts[i] + 1 for i in decode]
            width = max(-(-c // bs) for c in decode_ctx)
            table = [layout.block_tables[i][: -(-c // bs)] for i, c in zip(decode, decode_ctx)]
            table = [t + [0] * (width - len(t)) for t in table]
            self.decode_tokens = torch.tensor([offsets[i] for i in decode], device=device)
            # Flat block ids, row-major: one index_select per layer gathers every decode's blocks.
            self.decode_blocks = torch.tensor(table, device=device).view(-1)
            self.decode_width = width * bs
            lens = torch.tensor(decode_ctx, device=device)
            # True where a key position lies within the sequence (SDPA's boolean mask convention).
            self.decode_mask = (torch.arange(width * bs, device=device)[None, :]
                                < lens[:, None])[:, None, None, :]
            self.all_decode = len(decode) == len(layout.q_lens)
        self.prefills: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]] = []
        for i in seqs:
            n = layout.q_lens[i]
            if n == 1:
                continue
            start = layout.starts[i]
            if start == 0:
                self.prefills.append((offsets[i], offsets[i] + n, 0, None, None))
                continue
            ctx = start + n
            blocks = torch.tensor(layout.block_tables[i][: -(-ctx // bs)], device=device)
            q_pos = torch.arange(start, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]  # True = attend
            self.prefills.append((offsets[i], offsets[i] + n, ctx, blocks, mask))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output ``[tokens, heads * head_dim]`` for this layer's queries."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        if self.decode_tokens is not None and self.all_decode:
            return self._decode(q, k_pool, v_pool)
        out = q.new_empty(self.num_tokens, self.num_heads * self.head_dim)
        self._forward_gathered(q, k, v, k_pool, v_pool, out)
        return out

    def _forward_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor) -> None:
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.decode_tokens is not None:
            out[self.decode_tokens] = self._decode(q[self.decode_tokens], k_pool, v_pool)
        for s, e, ctx, blocks, mask in self.prefills:
            qs = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            if blocks is None:  # nothing cached before this chunk: attend to itself only
                ks = k[s:e].transpose(0, 1).unsqueeze(0)
                vs = v[s:e].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                ks = self.cache.gather(k_pool, blocks)[:ctx].transpose(0, 1).unsqueeze(0)
                vs = self.cache.gather(v_pool, blocks)[:ctx].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1).reshape(e - s, h * d)

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        b, width = q.shape[0], self.decode_width
        # [b, L, kvh, d] viewed as [b, kvh, L, d]: SDPA reads the strides, nothing is copied again.
        keys = self.cache.gather(k_pool, self.decode_blocks).view(b, width, kvh, d).transpose(1, 2)
        values = self.cache.gather(v_pool, self.decode_blocks).view(b, width, kvh, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.reshape(b, h, 1, d), keys, values,
                                           attn_mask=self.decode_mask, enable_gqa=True)
        return o.reshape(b, h * d)


class CpuPagedAttention(TorchPagedAttention):
    """Decodes and chunks of up to :attr:`ROW_LIMIT` tokens attend through the pool in place.

    Each such token is a query row of ``torch.ops.scalesim.paged_attention`` with its own key count
    (``start + j + 1`` for the ``j``-th token of a chunk, so chunks stay causal), all sequences in
    one call; longer chunks go the reference way (one SDPA per chunk).
    """

    #: the longest chunk taken as rows; beyond it SDPA's blocked matrix products are faster
    ROW_LIMIT = 32

    def __init__(self, cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int,
                 kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__(cache, num_heads, num_kv_heads, head_dim)
        self.kernel = kernel
        self.scale = head_dim ** -0.5

    def plan(self, layout: BatchLayout) -> None:
        rows = [i for i, n in enumerate(layout.q_lens) if n <= self.ROW_LIMIT]
        rest = [i for i, n in enumerate(layout.q_lens) if n > self.ROW_LIMIT]
        self._plan_gathered(layout, rest)
        self.has_rows = bool(rows)
        self.only_rows = not rest
        if not rows:
            return
        device, bs, offsets = self.cache.k.device, self.cache.block_size, self.offsets
        width = max(-(-(layout.starts[i] + layout.q_lens[i]) // bs) for i in rows)
        tables: list[list[int]] = []
        row_seq: list[int] = []
        row_keys: list[int] = []
        tokens: list[int] = []
        for r, i in enumerate(rows):
            n, start = layout.q_lens[i], layout.starts[i]
            table = layout.block_tables[i][: -(-(start + n) // bs)]
            tables.append(table + [0] * (width - len(table)))
            row_seq += [r] * n
            row_keys += range(start + 1, start + n + 1)
            tokens += range(offsets[i], offsets[i] + n)
        self.tables = torch.tensor(tables, dtype=torch.int32, device=device)
        self.row_seq = torch.tensor(row_seq, dtype=torch.int32, device=device)
        self.row_keys = torch.tensor(row_keys, dtype=torch.int32, device=device)
        self.row_tokens = torch.tensor(tokens, device=device)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        if self.only_rows:  # rows are every token, in order
            return self.kernel(q, k_pool, v_pool, self.tables, self.row_seq, self.row_keys,
                               self.scale)
        out = q.new_empty(self.num_tokens, self.num_heads * self.head_dim)
        if self.has_rows:
            out[self.row_tokens] = self.kernel(q[self.row_tokens], k_pool, v_pool, self.tables,
                                               self.row_seq, self.row_keys, self.scale)
        self._forward_gathered(q, k, v, k_pool, v_pool, out)
        return out


class FlashInferAttention:
    """flashinfer's paged prefill kernel over the whole ragged batch (CUDA only).

    One ``BatchPrefillWithPagedKVCacheWrapper`` serves prefill chunks and decodes alike (a decode
    is a causal query of length one). ``plan`` runs once per iteration; ``run`` once per layer.
    """

    def __init__(self, cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        import flashinfer  # only reached on CUDA, see select_attention

        self.cache = cache
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        device = cache.k.device
        self._workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

    def plan(self, layout: BatchLayout) -> None:
        bs = self.cache.block_size
        qo_indptr, kv_indptr, kv_indices, last_len = [0], [0], [], []
        for n, start, table in zip(layout.q_lens, layout.starts, layout.block_tables):
            ctx = start + n
            used = -(-ctx // bs)
            qo_indptr.append(qo_indptr[-1] + n)
            kv_indices.extend(table[:used])
            kv_indptr.append(kv_indptr[-1] + used)
            last_len.append(ctx - (used - 1) * bs)

        # On the host: plan() reads the index pointers there (a device copy would be copied
        # back, a synchronisation every step) and copies the rest to its own device buffers.
        def as_int(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        self._wrapper.plan(
            as_int(qo_indptr), as_int(kv_indptr), as_int(kv_indices), as_int(last_len),
            self.num_heads, self.num_kv_heads, self.head_dim, bs,
            causal=True, q_data_type=self.cache.k.dtype, kv_data_type=self.cache.k.dtype,
        )

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._wrapper.run(q.contiguous(), (self.cache.k[layer], self.cache.v[layer]))
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


#: the head sizes flashinfer's prefill kernels are built for
FLASHINFER_HEAD_DIMS = (64, 128, 256)


def flashinfer_unsupported(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flashinfer's kernels cannot serve KV of ``dtype`` and ``head_dim``, or None."""
    if dtype == torch.int8:
        return "its kernels do not read int8 KV rows (runtime.kv_cache_dtype int8 is CPU-only)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"its kernels take float16 or bfloat16 KV, not {dtype}"
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"its kernels take head sizes {FLASHINFER_HEAD_DIMS}, not {head_dim}"
    return None


def select_attention(cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int,
                     backend: str = "auto") -> TorchPagedAttention | FlashInferAttention:
    """``auto``: flashinfer on CUDA when it imports and its kernels take the KV's dtype and head
    size, the in-place kernel on CPU when it builds, the torch reference otherwise. ``cpu`` and
    ``flashinfer`` insist on theirs, ``torch`` on the reference."""
    if backend not in ("auto", "torch", "cpu", "flashinfer"):
        raise ValueError(f"attention backend must be auto, torch, cpu or flashinfer, got {backend!r}")
    on_cuda = cache.k.device.type == "cuda"
    if backend == "cpu" or (backend == "auto" and cache.k.device.type == "cpu"):
        from runtime.model.kernels import cpu_op

        if cache.k.device.type != "cpu":
            raise ValueError("attention backend cpu needs a CPU device")
        kernel = cpu_op("paged_attention") if cache.dtype in (torch.float32, torch.bfloat16) \
            else None
        if kernel is not None:
            return CpuPagedAttention(cache, num_heads, num_kv_heads, head_dim, kernel)
        if backend == "cpu":
            raise ValueError("attention backend cpu: the compiled kernel is unavailable for "
                             f"{cache.dtype} (see the warning above)")
    if backend == "flashinfer" or (backend == "auto" and on_cuda):
        if not on_cuda:
            raise ValueError("attention backend flashinfer needs a CUDA device")
        unsupported = flashinfer_unsupported(cache.k.dtype, head_dim)
        if unsupported and backend == "flashinfer":
            raise ValueError(f"attention backend flashinfer: {unsupported}")
        try:
            if unsupported:  # auto: the reference serves what flashinfer's kernels do not
                return TorchPagedAttention(cache, num_heads, num_kv_heads, head_dim)
            return FlashInferAttention(cache, num_heads, num_kv_heads, head_dim)
        except ImportError:
            if backend == "flashinfer":
                raise
    return TorchPagedAttention(cache, num_heads, num_kv_heads, head_dim)
