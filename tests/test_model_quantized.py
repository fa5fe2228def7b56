"""Quantized projections (runtime/model/weights.py) against the float32 reference.

On tiny random models: int4 finds exactly representable codes again, int8 and int4 logits stay
close to float32's. On the real model (SmolLM2-135M, whose file is Q4_1): teacher-forced
next-token agreement with float32 and the logit error, printed so a run reports them.
"""

from __future__ import annotations

import pytest
import torch

from runtime.model.llama import LlamaModel
from runtime.model.profiles import from_hf_config
from runtime.model.weights import (INT4_GROUP, Int4Projection, Int8Projection, check_quantization,
                                   make_projection, select_gemm)
from tests.model_fixtures import make_attention, paged_logits, paged_step, tiny_hf


def test_int4_recovers_codes_that_are_exactly_representable():
    gen = torch.Generator().manual_seed(0)
    n, k = 48, 4 * INT4_GROUP
    codes = torch.randint(0, 16, (n, k), generator=gen)
    codes[:, ::INT4_GROUP] = 0  # every group spans the full range, as a Q4_1 quantizer makes it
    codes[:, 1::INT4_GROUP] = 15
    # Scales and zero points that bfloat16 holds exactly, as the kernel keeps them.
    scale = (torch.rand(n, k // INT4_GROUP, generator=gen) * 0.05 + 0.01).bfloat16().float()
    low = (torch.randn(n, k // INT4_GROUP, generator=gen) * 0.1).bfloat16().float()
    weight = (codes.float().view(n, -1, INT4_GROUP) * scale[..., None] + low[..., None]).view(n, k)
    projection = Int4Projection(weight, None, dense_from=0)
    x = torch.randn(5, k, generator=gen)
    got = projection(x)
    ref = x @ weight.T
    # Only the bfloat16 activations and output round: no error from the weights themselves.
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2), (got - ref).abs().max()
    dense = make_projection(weight, None, "none", torch.float32, select_gemm(x.device, x.dtype))
    assert torch.allclose(dense(x), ref, atol=1e-5)


def test_quantized_projections_use_their_dense_copy_for_large_steps_only():
    weight, bias = torch.randn(64, 64), torch.randn(64)
    for kind in (Int4Projection, Int8Projection):
        projection = kind(weight, bias, dense_from=4)
        assert projection.step_bytes(3) < projection.step_bytes(4)  # packed codes, then bf16
        large = torch.randn(4, 64)
        dense = torch.nn.functional.linear(large.bfloat16(), weight.bfloat16(), bias.bfloat16())
        assert torch.equal(projection(large), dense.float())
        for x in (torch.randn(3, 64), large):
            ref = x @ weight.T + bias
            assert (projection(x) - ref).abs().max() < 0.1 * ref.abs().max(), kind
        assert kind(weight, None, dense_from=0).dense is None


@pytest.mark.parametrize("quantization,dtype,bound", [
    ("int8", torch.float32, 0.05), ("int8", torch.bfloat16, 0.05),
    ("int4", torch.float32, 0.15), ("int4", torch.bfloat16, 0.15),
    ("int8x8", torch.float32, 0.05), ("int8x8", torch.bfloat16, 0.05),
    ("int4x8", torch.float32, 0.15), ("int4x8", torch.bfloat16, 0.15)])
def test_quantized_logits_stay_close_to_float32(quantization, dtype, bound):
    hf = tiny_hf("qwen2")
    config = from_hf_config(hf.config)
    reference = LlamaModel.from_hf(hf, config)
    quantized = LlamaModel.from_hf(hf, config, quantization=quantization, dtype=dtype)
    ids = torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    chunks = [9, 8, 1, 1, 1, 1]  # chunks and decodes (all below the dense copy's step size)
    ref = paged_logits(reference, ids, chunks, backend="cpu")
    got = paged_logits(quantized, ids, chunks, backend="cpu")
    error = (got - ref).abs().max() / ref.abs().max()
    assert error < bound, f"{quantization}/{dtype}: relative logit error {error:.3f}"


@pytest.mark.parametrize("quantization", ["int4x8", "int8x8"])
def test_activation_quantized_decodes_do_not_depend_on_the_batch(quantization):
    """Three sequences decoded together give the logits each gives decoded alone, bit for bit
    (activations are quantized per row and block, never per batch)."""
    from runtime.kv_cache import KVCache

    hf = tiny_hf("llama3")
    model = LlamaModel.from_hf(hf, from_hf_config(hf.config), quantization=quantization,
                               dtype=torch.bfloat16)
    c = model.config
    cache = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim, dtype=torch.bfloat16)
    attention = make_attention("cpu", cache, c)
    seqs = [list(range(5, 5 + n)) for n in (3, 10, 7)]
    tables = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]

    def step(which: list[int], lens: list[int], starts: list[int]) -> torch.Tensor:
        return paged_step(model, cache, attention, seqs, tables, which, lens, starts)

    step([0, 1, 2], [len(s) - 1 for s in seqs], [0, 0, 0])
    last = [len(s) - 1 for s in seqs]
    together = step([0, 1, 2], [1, 1, 1], last)
    for i in range(3):  # the same slots are rewritten with the same keys and values
        assert torch.equal(step([i], [1], [last[i]])[0], together[i]), i


def test_bad_quantization_settings_fail_with_the_setting_named():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="runtime.quantization must be one of"):
        check_quantization("int3", cpu, torch.float32)
    with pytest.raises(ValueError, match="runs on the CPU only"):
        check_quantization("int4", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        check_quantization("int8", cpu, torch.float16)
    check_quantization("none", torch.device("cuda"), torch.float16)

    from pydantic import ValidationError

    from scalesim.config import RuntimeConfig

    with pytest.raises(ValidationError, match="needs dtype float32 or bfloat16"):
        RuntimeConfig(executor="torch", quantization="int4", dtype="float16")
    options = RuntimeConfig(executor="torch", quantization="int4").engine_options()
    assert options["quantization"] == "int4" and options["quantized_dense_from"] == 16


@pytest.mark.slow
@pytest.mark.model
def test_real_model_quantized_next_token_agreement_and_logit_error(capsys):
    from runtime.model.loader import load_hf_model

    hf, tokenizer = load_hf_model("smollm2-135m")
    config = from_hf_config(hf.config)
    text = ("You are a baker in a small coastal town. Every morning you open the shop, light the "
            "oven and greet the first customers. Today a storm is coming, and the mayor asks "
            "you to bake bread for the people who lost their roofs. What do you do next?")
    ids = tokenizer(text)["input_ids"]
    chunks = [len(ids) - 8] + [1] * 8
    reference = paged_logits(LlamaModel.from_hf(hf, config), ids, chunks, block_size=16,
                             backend="cpu")
    results = {}
    # dense_from 16 (the default): the prompt's chunk goes through the dense bfloat16 copy and
    # only the 8 decodes through the packed kernels; dense_from 0: every position through them,
    # which is what measures a kernel's own accuracy.
    # kv "int8": the KV pool keeps int8 rows (runtime.kv_cache_dtype), the decodes read them.
    for quantization, dtype, dense_from, kv in (
            ("int8", torch.float32, 16, "auto"), ("int4", torch.bfloat16, 16, "auto"),
            ("none", torch.bfloat16, 16, "auto"), ("int8x8", torch.bfloat16, 16, "auto"),
            ("int4x8", torch.bfloat16, 16, "auto"), ("int4", torch.bfloat16, 0, "auto"),
            ("int8x8", torch.bfloat16, 0, "auto"), ("int4x8", torch.bfloat16, 0, "auto"),
            ("int4x8", torch.float32, 0, "auto"), ("none", torch.float32, 16, "int8"),
            ("none", torch.bfloat16, 16, "int8"), ("int4x8", torch.bfloat16, 16, "int8")):
        model = LlamaModel.from_hf(hf, config, quantization=quantization, dtype=dtype,
                                   dense_from=dense_from)
        got = paged_logits(model, ids, chunks, block_size=16, backend="cpu",
                           quantized_kv=kv == "int8")
        agree = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        error = ((got - reference).abs().max(-1).values / reference.abs().max(-1).values).mean()
        key = (f"{quantization}/{str(dtype)[6:]}" + ("/all-packed" if dense_from == 0 else "")
               + ("/kv-int8" if kv == "int8" else ""))
        results[key] = (agree, float(error))
    with capsys.disabled():
        print(f"\nnext-token agreement with float32 over {len(ids)} positions, mean relative "
              "logit error: " + "; ".join(f"{k} {a:.1%}, {e:.3f}" for k, (a, e) in results.items()))
    # Measured 2026-12-02: bfloat16 96%, int8 98%, int4 94% (chunks of 16+ tokens use bf16).
    assert results["none/bfloat16"][0] >= 0.9
    assert results["int8/float32"][0] >= 0.85
    assert results["int4/bfloat16"][0] >= 0.9
    # Activations quantized per block of 32 must keep the bar of 94% (what weight-only
    # int4 measured on 2026-12-02). Measured 2026-12-06 on this text: int4x8 96.3% with the
    # dense copy, 94.4% all packed, against int4's 98.1% / 100% (the file's own codes: int4's
    # only error is bfloat16's; int4x8 adds the int8 activations', 1 position of 54 here).
    assert results["int4x8/bfloat16"][0] >= 0.94
    assert results["int4x8/bfloat16/all-packed"][0] >= 0.94
    assert results["int8x8/bfloat16/all-packed"][0] >= 0.9
    # int8 KV rows: the decodes attend to quantized keys and values.
    assert results["none/float32/kv-int8"][0] >= 0.94
    assert results["none/bfloat16/kv-int8"][0] >= 0.9
    assert results["int4x8/bfloat16/kv-int8"][0] >= 0.9
