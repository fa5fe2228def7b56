"""How a projection's weight is stored, and the matrix product that reads it.

A decode step of a small model on a CPU is bound by the bytes of weight it streams from memory:
SmolLM2-135M holds 540 MB in float32, and a single-sequence step reads every byte once. Each
projection of :class:`~runtime.model.llama.LlamaModel` is therefore one of three kinds, chosen by
``runtime.quantization``:

``none``
    :class:`DenseProjection`: the weight in the model's dtype, the reference. In float32 on CPU
    the product goes through oneDNN's GEMM rather than ``F.linear`` (MKL): on the AMD EPYC
    (AVX-512) development machine MKL's sgemm reached about 100 GFLOPS on one core and oneDNN's
    about 235 on the same shapes; the two differ only in summation order (:func:`select_gemm`).
``int8``
    :class:`Int8Projection`: one signed byte per weight and one scale per output row (symmetric),
    times activations quantized to int8 per step, in torch's quantized linear (int8 GEMMs). A
    quarter of float32's bytes.
``int4``
    :class:`Int4Projection`: four bits per weight in groups of 32 along the input, each group with
    its own scale and zero point; the layout of GGUF's ``Q4_1``, in which the built-in SmolLM2
    file ships, so re-quantizing its dequantized weights finds the file's own 4-bit codes again
    (up to the bfloat16 rounding of the group scales). Multiplied by
    ``_weight_int4pack_mm_for_cpu`` (bfloat16 activations) in steps of a few tokens, where a step
    is bound by weight bytes (an eighth of float32's); larger steps use an int8 copy.

Under int8 and int4 the vocabulary projection is int8 (GGUF files keep it at ``Q8_0`` or better:
it decides the token). Activations stay in the model's dtype (float32 or bfloat16) between the
products. The float32 model without quantization is the reference every format is checked against
(``tests/test_model_quantized.py``: logit error and greedy agreement).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32

Gemm = Callable[..., torch.Tensor]


class Projection(Protocol):
    """``x @ weight.T (+ bias)`` for activations ``x [tokens, in_features]``."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def step_bytes(self, tokens: int) -> int:
        """Weight bytes a step of ``tokens`` tokens reads."""
        ...


def _onednn_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def select_gemm(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> Gemm:
    """The dense GEMM: ``torch`` (``F.linear``) or ``onednn`` (CPU float32).

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
            usable = torch.allclose(_onednn_gemm(x, w, torch.ones(5)), F.linear(x, w, torch.ones(5)),
                                    atol=1e-5)
        except (RuntimeError, AttributeError):  # op missing from this build
            usable = False
    if not usable and backend == "onednn":
        raise ValueError("linear backend onednn needs a CPU float32 model and a torch with oneDNN")
    return _onednn_gemm if usable else F.linear


class DenseProjection:
    """The weight as it is, in the model's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemm: Gemm) -> None:
        self.weight, self.bias, self.gemm = weight, bias, gemm
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.gemm(x, self.weight)
        return self.gemm(x, self.weight, self.bias)

    def step_bytes(self, tokens: int) -> int:
        return _nbytes(self.weight, self.bias)


def _quantized_engine() -> str | None:
    """The quantized-op engine for int8 x int8 products on this CPU (fbgemm's successor ``x86``
    on x86, ``qnnpack`` on ARM), or ``None``."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)


class Int8Projection:
    """int8 weights, symmetric per output row, times int8 activations quantized per step.

    The product runs in torch's quantized linear (fbgemm / oneDNN int8 GEMMs, VNNI where the CPU
    has it), the way llama.cpp multiplies ``Q8_0`` weights by activations it quantizes to
    ``Q8_0``. The activation scale is one per step (per tensor), so a row's rounding depends on the
    other rows of its batch: a run stays reproducible (the schedule is deterministic), but a
    request may decode differently beside other requests. Where no quantized engine exists, the
    weight-only kernel ``_weight_int8pack_mm`` (bfloat16 activations) is used instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.float()
        self.out_features = weight.shape[0]
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.bias = None if bias is None else bias.float()
        self.nbytes = _nbytes(codes, scale, self.bias)
        self.packed: Any = None
        engine = _quantized_engine()
        if engine is not None:
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():  # quantized tensors are deprecated, the op is not
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        else:
            self.codes, self.scale = codes, scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False).to(x.dtype)
        y = torch._weight_int8pack_mm(x.bfloat16(), self.codes, self.scale)
        return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)

    def step_bytes(self, tokens: int) -> int:
        return self.nbytes


class Int4Projection:
    """Asymmetric 4-bit codes in groups of :data:`INT4_GROUP` inputs:
    ``weight ~= (code - 8) * scale + zero`` per group, the convention of torch's int4 kernel
    (bfloat16 activations; others are converted around it).

    The kernel unpacks codes inside the product, which pays while a step is bound by weight bytes
    (one or a few sequences decoding) and costs once it is bound by arithmetic: steps of
    ``int8_from`` tokens or more go through an :class:`Int8Projection` of the same weight instead
    (measured on the development machine, a batch-8 decode step of SmolLM2: 38 ms all int4, the
    int8 products three times faster than int4 ones at 8 rows). ``int8_from=0`` keeps no int8 copy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, int8_from: int) -> None:
        n, k = weight.shape
        self.out_features = n
        groups = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        zero = low + 8 * scale
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.reshape(n, k).to(torch.int32), 2)
        # [groups, out, 2]: the kernel's layout of (scale, zero)
        self.scale_zero = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.int8_from = int8_from
        self.large = Int8Projection(weight, bias) if int8_from > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.large is not None and x.shape[0] >= self.int8_from:
            return self.large(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, INT4_GROUP,
                                                       self.scale_zero)
        return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)

    def step_bytes(self, tokens: int) -> int:
        if self.large is not None and tokens >= self.int8_from:
            return self.large.step_bytes(tokens)
        return _nbytes(self.packed, self.scale_zero, self.bias)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_quantization(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` (one line, naming the setting) when ``quantization`` cannot run."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"runtime.quantization must be one of {', '.join(QUANTIZATIONS)}, "
                         f"got {quantization!r}")
    if quantization == "none":
        return
    if device.type != "cpu":
        raise ValueError(f"runtime.quantization {quantization} runs on the CPU only "
                         f"(torch's quantized kernels), not on {device.type}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"runtime.quantization {quantization} needs runtime.dtype float32 or "
                         f"bfloat16, got {dtype}")


#: int4 projections: the step size from which the int8 copy is used (see Int4Projection)
INT8_FROM = 4


def make_projection(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                    dtype: torch.dtype, gemm: Gemm, int8_from: int = INT8_FROM) -> Projection:
    """``weight [out, in]`` (any float dtype) stored as ``quantization`` for activations of
    ``dtype``. An int4 weight whose input size is not a multiple of the group falls back to int8."""
    if quantization == "int4" and weight.shape[1] % INT4_GROUP == 0:
        return Int4Projection(weight, bias, int8_from)
    if quantization in ("int4", "int8"):
        return Int8Projection(weight, bias)
    return DenseProjection(weight.to(dtype), None if bias is None else bias.to(dtype), gemm)
