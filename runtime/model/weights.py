"""How a projection's weight is stored, and the matrix product that reads it.

A decode step of a small model on a CPU is bound by the bytes of weight it streams from memory:
SmolLM2-135M holds 540 MB in float32, and a single-sequence step reads every byte once. Each
projection of :class:`~runtime.model.llama.LlamaModel` is therefore one of these kinds, chosen by
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

``int8x8`` and ``int4x8``
    :class:`ActQuantProjection`: the weights as GGUF's ``Q8_0`` / ``Q4_1`` (8- or 4-bit codes per
    block of 32 inputs with a float16 scale, and a float16 min for 4 bits), times activations
    quantized to int8 on the fly per row and block of 32 (GGUF's ``Q8_1``, as llama.cpp
    multiplies them), in the compiled ``scalesim::q8_linear`` (``csrc/quant_gemm.cpp``: AVX-512
    VNNI integer dot products where the CPU has them, a portable path elsewhere). The names keep
    ``int8`` / ``int4`` meaning weight-only; the ``x8`` says the activations are int8 too.

The weight-only kernels take bfloat16 activations (their float32 paths are not vectorized); a
float32 model converts around them. The vocabulary projection decides the token, so it never goes
below 8 bits (GGUF files keep it at ``Q8_0`` or better for the same reason): int8 under int8 and
int4, int8x8 under int8x8 and int4x8. The float32 model without quantization is the reference
every format is checked against (``tests/test_model_quantized.py`` prints the logit error and
teacher-forced next-token agreement per format; ``experiments/quant_agreement.py`` counts it over
about a thousand positions). Measured 2026-12-06 on SmolLM2 over 988 positions with every step
through the packed kernels: bfloat16 96.4%, int4 96.1%, int8 93.7%, int4x8 94.3% (94.9% in a
float32 model), int8x8 92.5%; every format 100% where float32's top two logits are more than 1.0
apart. The int4 codes are the file's own, so int4's error is bfloat16's; int4x8 adds the int8
activations' (spread over every projection: keeping any one kind in bfloat16 moved it < 0.6
points).

Weight-only kernels unpack codes inside the product: that pays while a step is bound by weight
bytes (decodes of a few sequences) and costs once it is bound by arithmetic (prefills, large decode
batches). A quantized projection therefore also keeps the dense bfloat16 weight and uses it for
steps of ``dense_from`` tokens or more; ``dense_from=0`` keeps only the packed weight (a quarter
or an eighth of the memory, every step through the packed kernel). The activation-quantized kernel
multiplies with integers and so stays ahead of the weight-only one at 8-12 rows, but at 16+ rows
the dense bfloat16 copy (oneDNN) is as fast or faster on the development machine (measured with
``experiments/bench_decode_step.py``), so the same threshold serves both. Quantizing activations
per *tensor* (torch's dynamic int8 linear, one scale per step) was measured faster for large steps
and dropped: activation outliers took SmolLM2's next-token agreement with float32 to 59%; one
scale per block of 32 confines an outlier to its own block.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4", "int8x8", "int4x8")
INT4_GROUP = 32
#: inputs per block of the activation-quantized formats (one int8 scale per block and row)
QBLOCK = 32

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


class ActQuantProjection:
    """Unsigned ``bits``-bit codes (4 or 8) per block of :data:`QBLOCK` inputs with a float16
    scale and min each, ``weight ~= code * scale + min``, times activations quantized to int8 per
    block on the fly (:func:`quantize_activations`), in the compiled ``scalesim::q8_linear``
    (VNNI integer dot products where the CPU has them); the formats ``int4x8`` and ``int8x8``.

    4-bit codes span each block's min to max (GGUF's ``Q4_1``, the layout of the built-in file,
    whose codes and float16 scales this finds again); 8-bit codes are symmetric, ``code - 128``
    times the block's scale (GGUF's ``Q8_0``), their min ``-128 * scale`` left to the kernel. The
    input size is padded to a multiple of 64; the codes are stored in the kernel's layout
    (:func:`pack_codes`). Steps of ``dense_from`` tokens or more use a dense bfloat16 copy as the
    weight-only formats do. Without the compiled kernels the product is
    :func:`q8_linear_reference` (the same arithmetic in torch, slowly).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 dense_from: int = 0) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        n, k = weight.shape
        self.out_features, self.in_features, self.bits = n, k, bits
        self.dense_from = dense_from
        self.dense = weight.to(torch.bfloat16) if dense_from > 0 else None
        self.dense_bias = None if bias is None else bias.to(torch.bfloat16)
        self.bias = None if bias is None else bias.float().contiguous()
        padded = -(-k // 64) * 64
        groups = F.pad(weight.float(), (0, padded - k)).view(n, padded // QBLOCK, QBLOCK)
        self.low: torch.Tensor | None
        # Codes are chosen for the float16 scale (and min) as stored, not the exact one.
        if bits == 4:
            low = groups.amin(dim=2).half()
            scale = ((groups.amax(dim=2) - low.float()) / 15).half()
            codes = torch.round((groups - low.float()[..., None])
                                / scale.float().clamp(min=1e-30)[..., None]).clamp(0, 15)
            self.low = low.contiguous()
        else:
            scale = (groups.abs().amax(dim=2) / 127).half()
            codes = torch.round(groups / scale.float().clamp(min=1e-30)[..., None])
            codes = codes.clamp(-127, 127) + 128
            self.low = None
        self.codes = pack_codes(codes.to(torch.uint8), bits)
        self.scale = scale.contiguous()
        from runtime.model.kernels import cpu_op

        self.kernel = cpu_op("q8_linear")
        if self.kernel is not None and not _warned_portable:
            _warn_if_portable()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] >= self.dense_from:
            return F.linear(x.to(torch.bfloat16), self.dense, self.dense_bias).to(x.dtype)
        if self.kernel is None:
            return q8_linear_reference(x, self.codes, self.scale, self.low, self.bias, self.bits)
        return self.kernel(x, self.codes, self.scale, self.low, self.bias, self.bits,
                           self.in_features)

    def packed_bytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.low, self.bias)

    def step_bytes(self, tokens: int) -> int:
        if self.dense is not None and tokens >= self.dense_from:
            return _nbytes(self.dense, self.dense_bias)
        return self.packed_bytes()


_warned_portable = False


def _warn_if_portable() -> None:
    """Say once when this CPU runs the kernel's portable path: on the development machine it
    was 4-8x slower than the weight-only int4 format (``experiments/bench_quant_gemm.py``)."""
    global _warned_portable
    _warned_portable = True
    if torch.ops.scalesim.quant_isa("best") == "portable":
        import warnings

        warnings.warn("scalesim: this CPU has no AVX-512 VNNI; the int4x8 / int8x8 formats run a "
                      "portable kernel, slower than int4 / int8 (weight-only)", RuntimeWarning,
                      stacklevel=3)


#: blocks per interleaved group of the kernel's layout (one int32 lane of a vpdpbusd each)
KGROUP = 16


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[out, blocks, 32]`` (an even number of blocks) in the layout of
    ``csrc/quant_gemm.cpp``: groups of 16 blocks interleaved four inputs at a time (step ``s``
    of a group: inputs ``4s .. 4s+3`` of each of its blocks), 4-bit steps 0-3 in the low
    nibbles and 4-7 in the high ones; the blocks after the last group by pairs, 4-bit pairs as
    32 bytes with the first block in the low nibbles. Returns ``uint8 [out, blocks * bits * 4]``."""
    n, blocks, _ = codes.shape
    groups = blocks // KGROUP
    head = codes[:, :groups * KGROUP].reshape(n, groups, KGROUP, 8, 4).permute(0, 1, 3, 2, 4)
    head = head.reshape(n, groups, 8, 64)
    tail = codes[:, groups * KGROUP:].reshape(n, -1, 2, QBLOCK)
    if bits == 4:
        head = head[:, :, :4] | (head[:, :, 4:] << 4)
        tail = tail[:, :, 0] | (tail[:, :, 1] << 4)
    return torch.cat([head.reshape(n, -1), tail.reshape(n, -1)], dim=1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned codes ``[out, blocks, 32]`` of :func:`pack_codes`' layout."""
    n = packed.shape[0]
    blocks = packed.shape[1] * 8 // bits // QBLOCK
    groups = blocks // KGROUP
    head_bytes = groups * KGROUP * QBLOCK * bits // 8
    head, tail = packed[:, :head_bytes], packed[:, head_bytes:]
    if bits == 4:
        h = head.reshape(n, groups, 4, 64)
        head = torch.cat([h & 0x0F, h >> 4], dim=2)
        t = tail.reshape(n, -1, 1, QBLOCK)
        tail = torch.cat([t & 0x0F, t >> 4], dim=2)
    head = head.reshape(n, groups, 8, KGROUP, 4).permute(0, 1, 3, 2, 4)
    return torch.cat([head.reshape(n, groups * KGROUP, QBLOCK), tail.reshape(n, -1, QBLOCK)],
                     dim=1)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x [rows, in]`` as int8 codes per block of :data:`QBLOCK` (``in`` padded to a
    multiple of 64 with zeros): ``(q [rows, blocks, 32]`` float holding integers in [-127, 127],
    ``d [rows, blocks])``, ``x ~= q * d``. The same float operations as the compiled kernel, so
    both find the same codes."""
    rows, k = x.shape
    padded = -(-k // 64) * 64
    blocks = F.pad(x.float(), (0, padded - k)).view(rows, padded // QBLOCK, QBLOCK)
    d = blocks.abs().amax(dim=2) / 127
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inverse[..., None]).clamp(-127, 127), d


def q8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        low: torch.Tensor | None, bias: torch.Tensor | None,
                        bits: int) -> torch.Tensor:
    """What ``scalesim::q8_linear`` computes, in torch: the test reference and the path where the
    compiled kernels are unavailable. Per block the integer dot products are exact in float32
    (at most 32 * 255 * 127 < 2**24); only the order of the float sums differs from the kernel."""
    q, d = quantize_activations(x)
    u = unpack_codes(codes, bits).float()
    scale = scale.float()
    low = -128 * scale if low is None else low.float()
    dots = torch.einsum("mbk,nbk->mnb", q, u)
    y = (dots * (scale[None] * d[:, None, :])).sum(-1)
    y = y + (d * q.sum(-1)) @ low.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


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
    if quantization in ("int4x8", "int8x8"):
        return ActQuantProjection(weight, bias, 4 if quantization == "int4x8" else 8, dense_from)
    if quantization == "int4" and weight.shape[1] % INT4_GROUP == 0:
        return Int4Projection(weight, bias, dense_from)
    if quantization in ("int4", "int8"):
        return Int8Projection(weight, bias, dense_from)
    return DenseProjection(weight.to(dtype), None if bias is None else bias.to(dtype), gemm)
