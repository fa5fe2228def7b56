"""The engine's own compiled CPU kernels, built on first use and cached.

``csrc/paged_attention.cpp`` registers ``torch.ops.scalesim.paged_attention``: attention of ragged
query rows over the paged KV pool read in place (no gather). It is compiled with the machine's C++
compiler through ``torch.utils.cpp_extension`` the first time an engine asks for it (about half a
minute) into ``$SCALESIM_CACHE/kernels``, under a name that carries a digest of the source and
flags, so later processes load it in milliseconds and an edited source is rebuilt.

:func:`paged_attention_op` returns the op, or ``None`` when it cannot be had (no compiler, a failed
build, ``SCALESIM_KERNELS=0``); the attention backend then gathers the blocks and calls SDPA, with
one warning saying why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"

# -ffast-math lets the compiler vectorize the dot products, the softmax sums and expf (glibc's
# vector math). It is passed when compiling only: linked with it, gcc would add crtfastmath,
# which flushes denormals for the whole process and so would change the float32 reference.
_BASE_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]

_state: dict[str, Callable[..., torch.Tensor] | None] = {}


def _build(flags: list[str]) -> None:
    from torch.utils.cpp_extension import load

    from runtime.model.loader import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()
                            + torch.__version__.encode()).hexdigest()[:12]
    name = f"scalesim_kernels_{digest}"
    directory = cache_dir() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    # -fopenmp: ATen's parallel_for is OpenMP pragmas in the header (torch's own libgomp pool).
    load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         build_directory=str(directory), is_python_module=False, verbose=False)


def paged_attention_op() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.scalesim.paged_attention``, compiled on first call; ``None`` if unavailable."""
    if "paged_attention" in _state:
        return _state["paged_attention"]
    op: Callable[..., torch.Tensor] | None = None
    if os.environ.get("SCALESIM_KERNELS", "1") == "0":
        _state["paged_attention"] = None
        return None
    # -march=native: the machine that builds is the machine that runs (the cache is local).
    # Where the compiler rejects it, a portable build still vectorizes for the baseline ISA.
    attempts = [_BASE_FLAGS + ["-march=native"], _BASE_FLAGS]
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        attempts = attempts[1:]
    error: Exception | None = None
    for flags in attempts:
        try:
            _build(flags)
            op = torch.ops.scalesim.paged_attention
            break
        except Exception as exc:  # a missing compiler or ninja, a compile error: all mean "none"
            error = exc
    if op is None:
        first = str(error).strip().splitlines()[0] if error and str(error).strip() else repr(error)
        warnings.warn(f"scalesim: the compiled paged-attention kernel is unavailable ({first}); "
                      "attention gathers KV blocks instead (slower)", RuntimeWarning, stacklevel=2)
    _state["paged_attention"] = op
    return op
