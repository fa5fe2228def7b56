"""Model architecture profiles: the numbers that shape a Llama-family transformer.

A :class:`ModelConfig` is everything the paged forward pass needs to know about an architecture.
It comes either from a transformers config (:func:`from_hf_config`, for real weights) or from the
built-in table :data:`PROFILES` below, which lets benchmarks, GPU runs and cost models build a
model of a known shape with random weights when the real ones are not on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder (Llama, SmolLM, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: ``None`` for plain RoPE, or the Llama-3 scaling parameters (``factor``,
    #: ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default=(2,))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h


_LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

#: Built-in architectures. Only ``smollm2-135m`` has real weights on a default install; the others
#: build random weights of the right shape (benchmarks, GPU smoke runs, cost models).
PROFILES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=(2,)),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True,
        eos_token_ids=(151645, 151643)),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=False,
        eos_token_ids=(151645, 151643)),
    "llama-3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
        tie_word_embeddings=False, eos_token_ids=(128001, 128009)),
}


def profile(name: str, **overrides: Any) -> ModelConfig:
    """Return the built-in profile ``name``, with fields replaced by ``overrides``."""
    if name not in PROFILES:
        raise KeyError(f"unknown model profile {name!r}; built-in: {', '.join(PROFILES)}")
    return replace(PROFILES[name], **overrides)


def from_hf_config(config: Any) -> ModelConfig:
    """Read a transformers Llama/Qwen2 config into a :class:`ModelConfig`."""
    model_type = getattr(config, "model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"model_type {model_type!r} is not a Llama-family decoder")
    # transformers 5 keeps RoPE settings in ``rope_parameters``; 4.x in rope_theta/rope_scaling.
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = {k: float(rope[k]) for k in _LLAMA3_SCALING}
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, llama3)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=config.max_position_embeddings,
        qkv_bias=bool(getattr(config, "attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
    )
