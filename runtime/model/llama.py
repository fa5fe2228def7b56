"""A Llama-family decoder whose forward pass reads and writes the paged KV pool.

One call of :meth:`LlamaModel.forward` advances a ragged batch: the new tokens of many sequences,
concatenated, each at its own positions. Per layer: RMSNorm, a fused q/k/v projection (plus
Qwen2-style bias), RoPE (with Llama-3 frequency scaling when configured), the new keys and values
written into the pool, paged grouped-query attention, the output projection, RMSNorm and a fused
SwiGLU MLP. LoRA deltas of each token's own adapter are added after each targeted projection.
Only the rows that will be sampled go through the final norm and the vocabulary projection.

Weights come from a transformers model (:meth:`from_hf`) or are random for a profile
(:meth:`random`).

On CPU in float32 the projections go through oneDNN's GEMM (:func:`select_linear`) rather than
``F.linear`` (MKL): on the AMD EPYC (AVX-512) development machine MKL's sgemm reached about 100
GFLOPS on one core and oneDNN's about 235 on the same shapes. Both are plain float32 GEMMs that
differ only in summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from runtime.kv_cache import KVCache
from runtime.model.profiles import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor            # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor              # [hidden, q]
    post_norm: torch.Tensor
    gate_up: torch.Tensor        # [2 intermediate, hidden]
    down: torch.Tensor           # [hidden, intermediate]


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 scaling applied when the config asks for it."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class Linear(Protocol):
    """A GEMM with ``F.linear``'s positional signature: ``x @ weight.T (+ bias)``.

    A protocol rather than a ``Callable`` alias because ``bias`` is optional: the projections
    without a bias call it with two arguments.
    """

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, /) -> torch.Tensor: ...


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def select_linear(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> Linear:
    """The GEMM behind every projection: ``torch`` (``F.linear``) or ``onednn`` (CPU float32).

    ``auto`` takes oneDNN on CPU in float32 when this torch build has it and it agrees with
    ``F.linear`` on a small product, ``F.linear`` otherwise.
    """
    if backend not in ("auto", "torch", "onednn"):
        raise ValueError(f"linear backend must be auto, torch or onednn, got {backend!r}")
    if backend == "torch":
        return F.linear
    usable = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if usable:
        try:
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            usable = torch.allclose(_onednn_linear(x, w, torch.ones(5)), F.linear(x, w, torch.ones(5)),
                                    atol=1e-5)
        except (RuntimeError, AttributeError):  # op missing from this build
            usable = False
    if not usable and backend == "onednn":
        raise ValueError("linear backend onednn needs a CPU float32 model and a torch with oneDNN")
    return _onednn_linear if usable else F.linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [tokens, heads, d]`` by half-split RoPE (the transformers convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights plus the paged forward pass. Not an ``nn.Module``: inference only."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor, linear: str = "auto") -> None:
        self.config = config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.inv_freq = rope_inv_freq(config).to(embed.device)
        self.linear = select_linear(embed.device, embed.dtype, linear)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_hf(cls, hf_model: Any, config: ModelConfig) -> "LlamaModel":
        """Share the weight tensors of a transformers Llama/Qwen2 causal LM (q/k/v and gate/up
        are concatenated into fused copies)."""
        inner = hf_model.model
        layers = []
        with torch.no_grad():
            for block in inner.layers:
                attn, mlp = block.self_attn, block.mlp
                bias = None
                if attn.q_proj.bias is not None:
                    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
                layers.append(LayerWeights(
                    input_norm=block.input_layernorm.weight.detach(),
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias=bias,
                    o=attn.o_proj.weight.detach(),
                    post_norm=block.post_attention_layernorm.weight.detach(),
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    down=mlp.down_proj.weight.detach(),
                ))
        return cls(config, inner.embed_tokens.weight.detach(), layers, inner.norm.weight.detach(),
                   hf_model.lm_head.weight.detach())

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> "LlamaModel":
        """Random weights of the right shape and scale (for benchmarks and shape-only runs)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * 0.02).to(device, dtype)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=dtype, device=device)

        layers = [LayerWeights(ones(h), w(q + 2 * kv, h), w(q + 2 * kv) if config.qkv_bias else None,
                               w(h, q), ones(h), w(2 * i, h), w(h, i))
                  for _ in range(config.num_layers)]
        embed = w(config.vocab_size, h)
        lm_head = embed if config.tie_word_embeddings else w(config.vocab_size, h)
        return cls(config, embed, layers, ones(h), lm_head)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [tokens, 1, d]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                cache: KVCache, attention: Any, lora: Any, sample_rows: torch.Tensor) -> torch.Tensor:
        """Run the batch and return float32 logits ``[len(sample_rows), vocab]``.

        ``slot_mapping[t]`` is the flat pool slot (``block * block_size + offset``) where token
        ``t``'s key and value go. ``attention`` has been planned for this batch; ``lora`` is a
        :class:`~runtime.lora.LoraBatch` or ``None``.
        """
        c = self.config
        t = input_ids.shape[0]
        q_size, kv_size = c.q_size, c.kv_size
        x = self.embed[input_ids]
        cos, sin = self.rope(positions)
        inter = c.intermediate_size
        linear = self.linear
        for li, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, c.rms_norm_eps)
            qkv = linear(h, w.qkv, w.qkv_bias)
            if lora is not None:
                lora.apply(li, "q_proj", h, qkv[:, :q_size])
                lora.apply(li, "k_proj", h, qkv[:, q_size:q_size + kv_size])
                lora.apply(li, "v_proj", h, qkv[:, q_size + kv_size:])
            q = apply_rope(qkv[:, :q_size].view(t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(qkv[:, q_size:q_size + kv_size].view(t, c.num_kv_heads, c.head_dim),
                           cos, sin)
            v = qkv[:, q_size + kv_size:].view(t, c.num_kv_heads, c.head_dim)
            cache.k[li].view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slot_mapping, k)
            cache.v[li].view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slot_mapping, v)
            a = attention.forward(li, q, k, v)
            o = linear(a, w.o)
            if lora is not None:
                lora.apply(li, "o_proj", a, o)
            x = x + o
            h = rms_norm(x, w.post_norm, c.rms_norm_eps)
            gu = linear(h, w.gate_up)
            if lora is not None:
                lora.apply(li, "gate_proj", h, gu[:, :inter])
                lora.apply(li, "up_proj", h, gu[:, inter:])
            m = F.silu(gu[:, :inter]) * gu[:, inter:]
            d = linear(m, w.down)
            if lora is not None:
                lora.apply(li, "down_proj", m, d)
            x = x + d
        x = rms_norm(x[sample_rows], self.norm, c.rms_norm_eps)
        return linear(x, self.lm_head).float()
