"""Create synthetic LoRA adapters in PEFT format, one directory per adapter.

Each adapter targets q/k/v/o/gate/up/down of every layer with rank ``r``. ``A`` is drawn like
PEFT's default init (scaled by ``1/sqrt(in)``); ``B`` is small and random rather than zero, so the
adapted model's outputs differ from the base model's. The files load with ``peft`` as well as with
the torch engine::

    python -m experiments.make_adapters --model smollm2-135m --n 32 --rank 16 --out /tmp/adapters
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from runtime.lora import module_shapes
from runtime.model.profiles import PROFILES, ModelConfig, from_hf_config

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def model_config(model: str) -> ModelConfig:
    """The architecture of ``model``: a built-in profile or a local Hugging Face directory."""
    if model in PROFILES:
        return PROFILES[model]
    from transformers import AutoConfig

    from runtime.model.loader import resolve_model

    return from_hf_config(AutoConfig.from_pretrained(resolve_model(model), local_files_only=True))


def make_adapters(out: str | Path, config: ModelConfig, n: int, rank: int, seed: int = 0,
                  b_std: float = 0.01, base_model: str = "smollm2-135m") -> list[str]:
    """Write ``n`` adapters under ``out`` (``adapter-000`` ...) and return their paths."""
    from safetensors.torch import save_file

    out = Path(out)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        directory = out / f"adapter-{i:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(config.num_layers):
            for module, (fan_in, fan_out) in module_shapes(config).items():
                name = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
                tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
                tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * b_std
        save_file(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
            "target_modules": sorted(_PARENT),
        }, indent=2))
        paths.append(str(directory))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="profile name or model directory")
    parser.add_argument("--n", type=int, default=32, help="number of adapters")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random B matrices")
    parser.add_argument("--out", required=True, help="directory to write the adapters into")
    args = parser.parse_args(argv)
    paths = make_adapters(args.out, model_config(args.model), args.n, args.rank, args.seed,
                          args.b_std, base_model=args.model)
    print(f"wrote {len(paths)} adapters of rank {args.rank} under {args.out}")


if __name__ == "__main__":
    main()
