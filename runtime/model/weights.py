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
    multiplied by torch's weight-only kernel ``_weight_int8pack_mm``. A quarter of float32's bytes.
``int4``
    :class:`Int4Projection`: four bits per weight in groups of 32 along the input, each group with
    its own scale and zero point; the layout of GGUF's ``Q4_1``, in which the built-in SmolLM2
    file ships, so re-quantizing its dequantized weights finds the file's own 4-bit codes again
    (up to the bfloat16 rounding of the group scales). Multiplied by
    ``_weight_int4pack_mm_for_cpu``. An eighth of float32's bytes.

Both kernels take bfloat16 activations (their float32 paths are not vectorized); a float32 model
converts around them. Under int8 and int4 the vocabulary projection is int8: it decides the token
(GGUF files keep it at ``Q8_0`` or better for the same reason). The float32 model without
quantization is the reference every format is checked against (``tests/test_model_quantized.py``:
logit error and teacher-forced next-token agreement; on SmolLM2, int8 98%, int4 94%).

Weight-only kernels unpack codes inside the product: that pays while a step is bound by weight
bytes (decodes of a few sequences) and costs once it is bound by arithmetic (prefills, large decode
batches). A quantized projection therefore also keeps the dense bfloat16 weight and uses it for
steps of ``dense_from`` tokens or more; ``dense_from=0`` keeps only the packed weight (a quarter
or an eighth of the memory, every step through the packed kernel). Quantizing activations too
(torch's dynamic int8 linear, one scale per step) was measured faster for large steps and dropped:
activation outliers took SmolLM2's next-token agreement with float32 to 59%.
"""

from __future__ import annotations

from typing import Callable, Protocol

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


class _PackedProjection:
    """What int8 and int4 share: the bias, and the dense weight for large steps."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense_from: int) -> None:
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.dense_from = dense_from
        self.dense = weight.to(torch.bfloat16) if dense_from > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.dense is not None and x.shape[0] >= self.dense_from:
            y = F.linear(xb, self.dense, self.bias)
        else:
            y = self.packed_product(xb)
            y = y if self.bias is None else y.add_(self.bias)
        return y.to(x.dtype)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def packed_bytes(self) -> int:
        raise NotImplementedError

    def step_bytes(self, tokens: int) -> int:
        if self.dense is not None and tokens >= self.dense_from:
            return _nbytes(self.dense, self.bias)
        return self.packed_bytes()


class Int8Projection(_PackedProjection):
    """Symmetric int8 per output row, ``weight ~= codes * scale[row]``, times bfloat16
    activations in torch's weight-only kernel ``_weight_int8pack_mm``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dense_from: int = 0) -> None:
        super().__init__(weight, bias, dense_from)
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.codes, self.scale)

    def packed_bytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.bias)


class Int4Projection(_PackedProjection):
    """Asymmetric 4-bit codes in groups of :data:`INT4_GROUP` inputs,
    ``weight ~= (code - 8) * scale + zero`` per group (the convention of torch's int4 kernel),
    times bfloat16 activations in ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dense_from: int = 0) -> None:
        super().__init__(weight, bias, dense_from)
        n, k = weight.shape
        groups = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        zero = low + 8 * scale
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.reshape(n, k).to(torch.int32), 2)
        # [groups, out, 2]: the kernel's layout of (scale, zero)
        self.scale_zero = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP,
                                                          self.scale_zero)

    def packed_bytes(self) -> int:
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


#: the step size from which quantized projections use their dense copy (see the module docstring)
DENSE_FROM = 16


def make_projection(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                    dtype: torch.dtype, gemm: Gemm, dense_from: int = DENSE_FROM) -> Projection:
    """``weight [out, in]`` (any float dtype) stored as ``quantization`` for activations of
    ``dtype``. An int4 weight whose input size is not a multiple of the group falls back to int8."""
    if quantization == "int4" and weight.shape[1] % INT4_GROUP == 0:
        return Int4Projection(weight, bias, dense_from)
    if quantization in ("int4", "int8"):
        return Int8Projection(weight, bias, dense_from)
    return DenseProjection(weight.to(dtype), None if bias is None else bias.to(dtype), gemm)
