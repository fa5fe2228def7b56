"""The engine's own compiled CPU kernels, built on first use and cached.

``csrc/`` holds them: ``paged_attention.cpp`` registers ``torch.ops.scalesim.paged_attention``
(attention of ragged query rows over the paged KV pool read in place, no gather),
``rms_norm.cpp`` ``rms_norm`` / ``add_rms_norm`` (RMSNorm fused with the residual add) and
``silu_mul``, and ``quant_gemm.cpp`` ``q8_linear`` (4- or 8-bit weights times activations
quantized to int8 per block of 32, the formats ``int4x8`` / ``int8x8``) with ``quant_isa`` (which
of its paths runs, for tests). They are
compiled together with the machine's C++ compiler through ``torch.utils.cpp_extension`` the first
time an engine asks (about half a minute) into ``$SCALESIM_CACHE/kernels``, under a name that
carries a digest of the sources and flags, so later processes load them in milliseconds and an
edited source is rebuilt. The build compiles copies of the sources kept in that directory, not
the checkout's files: the build file then names the same paths whichever checkout (or
installed copy) asks, so two checkouts that share the cache never rebuild each other's kernels.

:func:`cpu_op` returns an op, or ``None`` when the kernels cannot be had (no compiler, a failed
build, ``SCALESIM_KERNELS=0``); the engine then takes the plain torch path (gathered blocks and
SDPA, the composite RMSNorm), with one warning saying why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("paged_attention.cpp", "quant_gemm.cpp", "rms_norm.cpp")

# -ffast-math lets the compiler vectorize the dot products, the softmax sums and expf (glibc's
# vector math). It is passed when compiling only: linked with it, gcc would add crtfastmath,
# which flushes denormals for the whole process and so would change the float32 reference.
_BASE_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]

_state: dict[str, bool] = {}


def _build(flags: list[str], csrc: Path = CSRC) -> Path:
    """Build (or load the build of) the sources in ``csrc``; return the build directory."""
    from torch.utils.cpp_extension import load

    from runtime.model.loader import cache_dir

    files = sorted(csrc.iterdir())  # the headers too: an edited one must rebuild
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files) + " ".join(flags).encode()
                            + torch.__version__.encode()).hexdigest()[:12]
    name = f"scalesim_kernels_{digest}"
    directory = cache_dir() / "kernels" / name
    copies = directory / "src"
    copies.mkdir(parents=True, exist_ok=True)
    for source in files:  # same content as the digest says; written whole, never half
        target = copies / source.name
        if not target.exists():
            partial = copies / f".{source.name}.{os.getpid()}.tmp"
            partial.write_bytes(source.read_bytes())
            os.replace(partial, target)
    # torch looks for `ninja` on PATH; the one pip installed sits beside this interpreter.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    # -fopenmp: ATen's parallel_for is OpenMP pragmas in the header (torch's own libgomp pool).
    load(name=name, sources=[str(copies / source) for source in SOURCES], extra_cflags=flags,
         extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
         verbose=False)
    return directory


def _built() -> bool:
    """Build (or load) the kernels once per process; ``False`` if they cannot be had."""
    if "built" in _state:
        return _state["built"]
    built = False
    if os.environ.get("SCALESIM_KERNELS", "1") != "0":
        # -march=native: the machine that builds is the machine that runs (the cache is local).
        # Where the compiler rejects it, a portable build still vectorizes for the baseline ISA.
        attempts = [_BASE_FLAGS + ["-march=native"], _BASE_FLAGS]
        if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
            attempts = attempts[1:]
        error: Exception | None = None
        for flags in attempts:
            try:
                _build(flags)
                built = True
                break
            except Exception as exc:  # a missing compiler or ninja, a compile error: all mean "none"
                error = exc
        if not built:
            text = str(error).strip()
            first = text.splitlines()[0] if text else repr(error)
            warnings.warn(f"scalesim: the compiled CPU kernels are unavailable ({first}); the "
                          "engine uses plain torch ops instead (slower)", RuntimeWarning,
                          stacklevel=3)
    _state["built"] = built
    return built


def cpu_op(name: str) -> Callable[..., torch.Tensor] | None:
    """``torch.ops.scalesim.<name>``, the kernels compiled on first call; ``None`` if unavailable."""
    if not _built():
        return None
    return getattr(torch.ops.scalesim, name)
