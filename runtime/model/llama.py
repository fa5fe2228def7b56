"""A Llama-family decoder whose forward pass reads and writes the paged KV pool.

One call of :meth:`LlamaModel.forward` advances a ragged batch: the new tokens of many sequences,
concatenated, each at its own positions. Per layer: RMSNorm, a fused q/k/v projection (plus
Qwen2-style bias), RoPE on queries and keys together (with Llama-3 frequency scaling when
configured), the new keys and values written into the pool, paged grouped-query attention, the
output projection, RMSNorm and a fused SwiGLU MLP. LoRA deltas of each token's own adapter are
added after each targeted projection. Only the rows that will be sampled go through the final norm
and the vocabulary projection.

:meth:`LlamaModel.hidden_states` runs the same layers over one sequence without the pool (its
keys and values kept by the caller, chunk after chunk) and returns the final-norm hidden states:
what embeddings pool.

Each projection is a :mod:`runtime.model.weights` projection: dense in the model's dtype (the
float32 reference) or weight-only int8 / int4 (``quantization``). Weights come from checkpoint
tensors (:meth:`from_tensors`: a ``model.safetensors`` file, or a loaded transformers model's
state through :meth:`from_hf`) or are random for a profile (:meth:`random`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from runtime.kv_cache import KVCache
from runtime.model.profiles import ModelConfig
from runtime.model.weights import (DENSE_FROM, Projection, check_quantization,
                                   make_projection, select_gemm)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Projection              # hidden -> q + 2 kv (with Qwen2's bias)
    o: Projection                # q -> hidden
    post_norm: torch.Tensor
    gate_up: Projection          # hidden -> 2 intermediate
    down: Projection             # intermediate -> hidden


@dataclass
class DenseLayer:
    """One layer's tensors as a checkpoint holds them (before they become projections)."""

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's RMSNorm; on float32 it gave the same bits as transformers' formula."""
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``x += residual`` in place, then RMSNorm of ``x``: the plain-torch form of the compiled
    ``scalesim::add_rms_norm``."""
    x.add_(residual)
    return rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused gate/up projection: ``silu(gate) * up``."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :half]) * gate_up[:, half:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [tokens, heads, d]`` by half-split RoPE (the transformers convention), given
    the half-width ``cos``/``sin [tokens, 1, d / 2]``. Returns a new contiguous tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaModel:
    """Weights plus the paged forward pass. Not an ``nn.Module``: inference only.

    Built from dense checkpoint tensors (``layers``), which become projections stored as
    ``quantization`` computing in ``dtype`` (default: the tensors' own dtype); ``linear`` picks
    the dense GEMM (:func:`~runtime.model.weights.select_gemm`); quantized projections use a dense
    bfloat16 copy for steps of ``dense_from`` tokens or more (0: no copy).
    """

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[DenseLayer],
                 norm: torch.Tensor, lm_head: torch.Tensor, linear: str = "auto",
                 quantization: str = "none", dtype: torch.dtype | None = None,
                 dense_from: int = DENSE_FROM) -> None:
        dtype = dtype or embed.dtype
        check_quantization(quantization, embed.device, dtype)
        self.config, self.quantization = config, quantization
        gemm = select_gemm(embed.device, dtype, linear)

        def project(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Projection:
            return make_projection(weight, bias, quantization, dtype, gemm, dense_from)

        self.layers = [LayerWeights(layer.input_norm.to(dtype), project(layer.qkv, layer.qkv_bias),
                                    project(layer.o), layer.post_norm.to(dtype),
                                    project(layer.gate_up), project(layer.down))
                       for layer in layers]
        self.embed, self.norm = embed.to(dtype), norm.to(dtype)
        # The vocabulary projection decides the token: never below int8.
        head = {"int4": "int8", "int4x8": "int8x8"}.get(quantization, quantization)
        self.lm_head = make_projection(lm_head, None, head, dtype, gemm, dense_from)
        self.inv_freq = rope_inv_freq(config).to(embed.device)
        # The compiled kernels where they exist (CPU, float32/bfloat16): one op instead of several.
        self.rms_norm, self.add_rms_norm, self.silu_mul = rms_norm, add_rms_norm, silu_mul
        if embed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from runtime.model.kernels import cpu_op

            fused = cpu_op("add_rms_norm"), cpu_op("rms_norm"), cpu_op("silu_mul")
            if all(op is not None for op in fused):
                self.add_rms_norm, self.rms_norm, self.silu_mul = fused  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def step_weight_bytes(self, tokens: int, sampled: int) -> int:
        """Projection bytes a step of ``tokens`` tokens, ``sampled`` of them sampled, reads
        (norms and the embedding rows aside)."""
        return self.lm_head.step_bytes(sampled) + sum(
            p.step_bytes(tokens) for w in self.layers for p in (w.qkv, w.o, w.gate_up, w.down))

    @classmethod
    def from_hf(cls, hf_model: Any, config: ModelConfig, quantization: str = "none",
                linear: str = "auto", dtype: torch.dtype | None = None,
                dense_from: int = DENSE_FROM) -> "LlamaModel":
        """The weights of a loaded transformers Llama/Qwen2 causal LM (:meth:`from_tensors`)."""
        return cls.from_tensors(hf_model.state_dict(), config, quantization=quantization,
                                linear=linear, dtype=dtype, dense_from=dense_from)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: ModelConfig,
                     quantization: str = "none", linear: str = "auto",
                     dtype: torch.dtype | None = None,
                     dense_from: int = DENSE_FROM) -> "LlamaModel":
        """The weights of a Llama/Qwen2 checkpoint, named as transformers names them (a
        ``state_dict`` or a ``model.safetensors`` file): dense ones shared, q/k/v and gate/up
        concatenated into fused copies. A tied head is the embedding (checkpoints leave it out)."""
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if p + "self_attn.q_proj.bias" in tensors:
                bias = torch.cat([tensors[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            layers.append(DenseLayer(
                input_norm=tensors[p + "input_layernorm.weight"],
                qkv=torch.cat([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                qkv_bias=bias,
                o=tensors[p + "self_attn.o_proj.weight"],
                post_norm=tensors[p + "post_attention_layernorm.weight"],
                gate_up=torch.cat([tensors[p + "mlp.gate_proj.weight"],
                                   tensors[p + "mlp.up_proj.weight"]]),
                down=tensors[p + "mlp.down_proj.weight"],
            ))
        embed = tensors["model.embed_tokens.weight"]
        lm_head = embed if config.tie_word_embeddings else tensors["lm_head.weight"]
        return cls(config, embed, layers, tensors["model.norm.weight"], lm_head, linear=linear,
                   quantization=quantization, dtype=dtype, dense_from=dense_from)

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0,
               quantization: str = "none") -> "LlamaModel":
        """Random weights of the right shape and scale (for benchmarks and shape-only runs).

        Drawn on ``device`` itself (a 7B profile takes seconds on a GPU, minutes on its host's
        CPU), so the same ``seed`` gives the same weights on the same kind of device."""
        gen = torch.Generator(device=device).manual_seed(seed)
        h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(dtype)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=dtype, device=device)

        layers = [DenseLayer(ones(h), w(q + 2 * kv, h), w(q + 2 * kv) if config.qkv_bias else None,
                             w(h, q), ones(h), w(2 * i, h), w(h, i))
                  for _ in range(config.num_layers)]
        embed = w(config.vocab_size, h)
        lm_head = embed if config.tie_word_embeddings else w(config.vocab_size, h)
        return cls(config, embed, layers, ones(h), lm_head, quantization=quantization)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width ``cos``/``sin [tokens, 1, d / 2]`` of ``positions``."""
        freqs = (positions.float()[:, None] * self.inv_freq[None, :])[:, None, :]
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                cache: KVCache, attention: Any, lora: Any, sample_rows: torch.Tensor) -> torch.Tensor:
        """Run the batch and return float32 logits ``[len(sample_rows), vocab]``.

        ``slot_mapping[t]`` is the flat pool slot (``block * block_size + offset``) where token
        ``t``'s key and value go. ``attention`` has been planned for this batch; ``lora`` is a
        :class:`~runtime.lora.LoraBatch` or ``None``.
        """
        c = self.config

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write_tokens(li, slot_mapping, k, v)
            out: torch.Tensor = attention.forward(li, q, k, v)
            return out

        x, down = self._layers(input_ids, positions, attend, lora)
        x = x[sample_rows].add_(down[sample_rows])
        return self.lm_head(self.rms_norm(x, self.norm, c.rms_norm_eps)).float()

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, start: int,
                      past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The last hidden states ``[tokens, hidden]`` (after the final norm) of one sequence's
        tokens at positions ``start ..``, without the paged pool: each layer attends to the keys
        and values of the earlier chunks in ``past`` (one ``(k, v)`` per layer, extended here;
        empty for the first chunk). For embeddings (:mod:`runtime.embedding`)."""
        c = self.config
        heads, kv_heads, d = c.num_heads, c.num_kv_heads, c.head_dim
        n = input_ids.shape[0]
        positions = torch.arange(start, start + n, device=input_ids.device)
        mask = None if start == 0 else (torch.arange(start + n, device=input_ids.device)[None, :]
                                        <= positions[:, None])  # True: attend

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if len(past) > li:
                k, v = torch.cat([past[li][0], k]), torch.cat([past[li][1], v])
                past[li] = (k, v)
            else:
                past.append((k, v))
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
                enable_gqa=True)
            return o[0].transpose(0, 1).reshape(n, heads * d)

        x, down = self._layers(input_ids, positions, attend, None)
        return self.rms_norm(x.add_(down), self.norm, c.rms_norm_eps).float()

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                lora: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over ``input_ids``: the residual stream and the last layer's MLP
        output, not yet added to it. ``attend(layer, q, k, v)`` is the attention, whose keys
        and values come from wherever the caller keeps them."""
        c = self.config
        t = input_ids.shape[0]
        heads, kv_heads, d = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.q_size, c.kv_size
        x = self.embed[input_ids]
        cos, sin = self.rope(positions)
        inter = c.intermediate_size
        eps = c.rms_norm_eps
        norm, add_norm = self.rms_norm, self.add_rms_norm
        down: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to x
        for li, w in enumerate(self.layers):
            h = norm(x, w.input_norm, eps) if down is None else add_norm(x, down, w.input_norm, eps)
            qkv = w.qkv(h)
            if lora is not None:
                lora.apply_group(li, "qkv", h, [qkv[:, :q_size], qkv[:, q_size:q_size + kv_size],
                                                qkv[:, q_size + kv_size:]])
            # Queries and keys are rotated in one pass: [tokens, heads + kv_heads, d].
            qk = apply_rope(qkv[:, :q_size + kv_size].view(t, heads + kv_heads, d), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_size + kv_size:].view(t, kv_heads, d)
            a = attend(li, q, k, v)
            o = w.o(a)
            if lora is not None:
                lora.apply(li, "o_proj", a, o)
            h = add_norm(x, o, w.post_norm, eps)
            gu = w.gate_up(h)
            if lora is not None:
                lora.apply_group(li, "gate_up", h, [gu[:, :inter], gu[:, inter:]])
            m = self.silu_mul(gu)
            down = w.down(m)
            if lora is not None:
                lora.apply(li, "down_proj", m, down)
        assert down is not None
        return x, down
