"""Tiny random-weight transformers models and the chunked paged forward, shared by the model tests
(``test_model_llama``, ``test_cuda``)."""

from __future__ import annotations

from typing import Any

import torch

from runtime.kv_cache import KVCache
from runtime.model.attention import (BatchLayout, CpuPagedAttention, FlashInferAttention,
                                     TorchPagedAttention)
from runtime.model.llama import LlamaModel
from runtime.model.profiles import ModelConfig


def tiny_hf(kind: str, hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2) -> Any:
    """A 2-layer random transformers ``llama3`` (Llama-3 RoPE scaling, untied head) or ``qwen2``
    (q/k/v bias, tied embeddings) causal LM, seeded, in eval mode, float32, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config: Any
    model: Any
    common: dict[str, Any] = dict(
        vocab_size=97, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=256)
    if kind == "llama3":
        config = LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    return model.eval()


def make_attention(backend: str, cache: KVCache, c: ModelConfig) -> Any:
    """``torch``: the gathering reference (any device); ``cpu``: the in-place compiled kernel
    (which must build on this machine); ``flashinfer``: flashinfer's paged kernel (CUDA)."""
    if backend == "torch":
        return TorchPagedAttention(cache, c.num_heads, c.num_kv_heads, c.head_dim)
    if backend == "flashinfer":
        return FlashInferAttention(cache, c.num_heads, c.num_kv_heads, c.head_dim)
    from runtime.model.kernels import cpu_op

    kernel = cpu_op("paged_attention")
    assert kernel is not None, "the paged-attention kernel did not build on this machine"
    return CpuPagedAttention(cache, c.num_heads, c.num_kv_heads, c.head_dim, kernel)


def paged_logits(model: LlamaModel, ids: list[int], chunks: list[int], block_size: int = 4,
                 table: list[int] | None = None, backend: str = "torch",
                 quantized_kv: bool = False) -> torch.Tensor:
    """All-position logits of ``ids`` computed chunk by chunk through a scrambled block table, on
    the model's device, with the attention ``backend`` (see :func:`make_attention`), over an
    int8 pool if ``quantized_kv``."""
    c, device = model.config, model.device
    cache = KVCache(c.num_layers, 64, block_size, c.num_kv_heads, c.head_dim, dtype=model.dtype,
                    device=device, quantized=quantized_kv)
    attention = make_attention(backend, cache, c)
    table = table or [(7 * i + 3) % 64 for i in range(-(-len(ids) // block_size))]
    outs, start = [], 0
    for n in chunks:
        pos = list(range(start, start + n))
        attention.plan(BatchLayout([n], [start], [table]))
        slots = [table[p // block_size] * block_size + p % block_size for p in pos]
        outs.append(model.forward(torch.tensor(ids[start:start + n], device=device),
                                  torch.tensor(pos, device=device),
                                  torch.tensor(slots, device=device), cache, attention, None,
                                  torch.arange(n, device=device)))
        start += n
    return torch.cat(outs)


def paged_step(model: LlamaModel, cache: KVCache, attention: Any, seqs: list[list[int]],
               tables: list[list[int]], which: list[int], lens: list[int], starts: list[int],
               block_size: int = 4) -> torch.Tensor:
    """One batched step over sequences ``which`` (``lens[i]`` tokens of each from ``starts[i]``)
    through the paged cache; the logits of each one's last token."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    for i, n, st in zip(which, lens, starts):
        ids += seqs[i][st:st + n]
        pos += range(st, st + n)
        slots += [tables[i][p // block_size] * block_size + p % block_size
                  for p in range(st, st + n)]
        rows.append(len(ids) - 1)
    attention.plan(BatchLayout(lens, starts, [tables[i] for i in which]))
    return model.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), cache,
                         attention, None, torch.tensor(rows))
