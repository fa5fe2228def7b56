"""The activation-quantized GEMM ``scalesim::q8_linear`` (runtime/model/csrc/quant_gemm.cpp)
against its torch reference and the float32 product.

Every path the machine can run is checked (AVX-512 VNNI where the CPU has it, the portable one
always): the kernel finds the reference's activation codes, so the two differ only by the order
of float sums; a row's output does not depend on the rows beside it (bit for bit); and without the
compiled kernels the projection computes the reference.
"""

from __future__ import annotations

import pytest
import torch

from runtime.model.kernels import cpu_op
from runtime.model.weights import (ActQuantProjection, make_projection, pack_codes,
                                   q8_linear_reference, quantize_activations, select_gemm,
                                   unpack_codes)

KERNEL = cpu_op("q8_linear")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the compiled kernels did not build")


def isas() -> list[str]:
    """The kernel paths this CPU runs (the portable one, and VNNI where cpuid has it)."""
    if KERNEL is None:
        return []
    best = torch.ops.scalesim.quant_isa("auto")
    return sorted({"portable", best})


@pytest.fixture(params=["portable", "avx512_vnni"])
def isa(request):
    if request.param not in isas():
        pytest.skip(f"this CPU does not run the {request.param} path")
    torch.ops.scalesim.quant_isa(request.param)
    yield request.param
    torch.ops.scalesim.quant_isa("auto")


def magnitude(x: torch.Tensor, p: ActQuantProjection) -> torch.Tensor:
    """Per output, the sum of the absolute terms the kernel adds: the scale of its rounding."""
    q, d = quantize_activations(x)
    u = unpack_codes(p.codes, p.bits).float()
    scale = p.scale.float()
    low = -128 * scale if p.low is None else p.low.float()
    terms = torch.einsum("mbk,nbk->mnb", q, u).abs() * (scale[None] * d[:, None, :])
    total = terms.sum(-1) + (d * q.sum(-1)).abs() @ low.abs().T
    return total if p.bias is None else total + p.bias.abs()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(37, 96), (64, 576), (30, 1536), (9, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_torch_reference(isa, bits, n, k, dtype):
    gen = torch.Generator().manual_seed(n + k + bits)
    weight = torch.randn(n, k, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen)
    projection = ActQuantProjection(weight, bias, bits)
    for rows in (1, 3, 4, 5, 16):
        x = (torch.randn(rows, k, generator=gen) * 2).to(dtype)
        x[0, 3] = 40.0  # an outlier coarsens its own block only
        got = projection(x).float()
        ref = q8_linear_reference(x, projection.codes, projection.scale, projection.low,
                                  projection.bias, bits).float()
        assert got.dtype == ref.dtype and got.shape == (rows, n)
        # float32: the sums' order only; bfloat16: plus the rounding of the output.
        bound = 1e-6 * magnitude(x, projection)
        if dtype == torch.bfloat16:
            bound = bound + 2 ** -7 * ref.abs()  # one bfloat16 step apart at most
        assert ((got - ref).abs() <= bound).all(), (isa, rows, (got - ref).abs().max())


@needs_kernel
def test_rows_do_not_depend_on_the_rows_beside_them(isa):
    gen = torch.Generator().manual_seed(5)
    for bits in (4, 8):
        projection = ActQuantProjection(torch.randn(72, 576, generator=gen) * 0.05, None, bits)
        x = torch.randn(13, 576, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            xs = x.to(dtype)
            alone = torch.cat([projection(xs[i:i + 1]) for i in range(13)])
            for rows in (2, 3, 5, 8, 13):
                assert torch.equal(projection(xs[:rows]), alone[:rows]), (isa, bits, rows)
            assert torch.equal(projection(xs[4:11]), alone[4:11])


def test_reference_stays_close_to_the_float_product():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 320, generator=gen) * 0.05
    x = torch.randn(6, 320, generator=gen)
    ref = x @ weight.T
    for bits, bound in ((8, 0.02), (4, 0.15)):
        p = ActQuantProjection(weight, None, bits)
        got = q8_linear_reference(x, p.codes, p.scale, p.low, None, bits)
        error = (got - ref).abs().max() / ref.abs().max()
        assert error < bound, (bits, error)
        # The activations' own rounding: a block's codes times its scale within half a step.
        q, d = quantize_activations(x)
        assert ((q * d[..., None]).view(6, -1)[:, :320] - x).abs().max() <= d.max() / 2 + 1e-7


def test_four_bit_codes_that_are_exactly_representable_are_found_again():
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 128
    codes = torch.randint(0, 16, (n, k), generator=gen)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every block spans the full range (as Q4_1 makes it)
    # Scales and mins that float16 holds, as a GGUF file stores them.
    scale = (torch.rand(n, k // 32, generator=gen) * 0.05 + 0.01).half().float()
    low = (torch.randn(n, k // 32, generator=gen) * 0.1).half().float()
    weight = (codes.float().view(n, -1, 32) * scale[..., None] + low[..., None]).view(n, k)
    p = ActQuantProjection(weight, None, 4)
    assert torch.equal(unpack_codes(p.codes, 4).reshape(n, k).long(), codes)
    assert torch.equal(p.scale.float(), scale) and torch.equal(p.low.float(), low)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("blocks", [2, 16, 18, 48, 54])
def test_the_kernel_layout_round_trips(bits, blocks):
    """Whole groups of 16 blocks interleaved, the rest by pairs: packing then unpacking is exact."""
    codes = torch.randint(0, 2 ** bits, (3, blocks, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(blocks))
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, blocks * 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_without_the_kernels_the_projection_computes_the_reference():
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(20, 64, generator=gen), torch.randn(20, generator=gen)
    p = ActQuantProjection(weight, bias, 4, dense_from=4)
    p.kernel = None  # as when SCALESIM_KERNELS=0 or no compiler
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(p(x), q8_linear_reference(x, p.codes, p.scale, p.low, p.bias, 4))
    large = torch.randn(4, 64, generator=gen)  # the dense bfloat16 copy from dense_from rows
    dense = torch.nn.functional.linear(large.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert torch.equal(p(large), dense.float())
    assert p.step_bytes(3) < p.step_bytes(4)


def test_formats_choose_their_projections():
    weight = torch.randn(8, 64)
    gemm = select_gemm(torch.device("cpu"), torch.float32)
    four = make_projection(weight, None, "int4x8", torch.float32, gemm)
    eight = make_projection(weight, None, "int8x8", torch.float32, gemm)
    assert isinstance(four, ActQuantProjection) and four.bits == 4
    assert isinstance(eight, ActQuantProjection) and eight.bits == 8
    assert four.packed_bytes() < eight.packed_bytes()
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ActQuantProjection(weight, None, 2)
