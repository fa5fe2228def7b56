"""The paged Llama forward pass against transformers, on tiny random-weight models (no real model)."""

from __future__ import annotations

import pytest
import torch

from runtime.kv_cache import KVCache
from runtime.model.attention import BatchLayout, CpuPagedAttention
from runtime.model.llama import LlamaModel
from runtime.model.weights import select_gemm
from runtime.model.profiles import PROFILES, from_hf_config, profile
from runtime.model.sampling import filter_logits, sample
from runtime.request import SamplingParams
from tests.model_fixtures import make_attention, paged_logits, paged_step, tiny_hf


BACKENDS = ["torch", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_paged_forward_matches_transformers_in_chunks_and_decodes(kind, backend):
    hf = tiny_hf(kind)
    config = from_hf_config(hf.config)
    assert (config.rope_scaling is not None) == (kind == "llama3")
    assert config.qkv_bias == (kind == "qwen2")
    model = LlamaModel.from_hf(hf, config)
    ids = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = paged_logits(model, ids, [9, 6, 1, 1, 6], backend=backend)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_kernel_rows_and_long_chunks_mix_in_one_batch():
    """Chunks longer than the kernel's row limit take SDPA beside rows of the kernel: a 40-token
    chunk over cached context, a fresh 35-token prefill, a 3-token chunk and a decode, at once."""
    hf = tiny_hf("qwen2")
    model = LlamaModel.from_hf(hf, from_hf_config(hf.config))
    c = model.config
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (50, 35, 13, 9)]
    done = [10, 0, 10, 8]  # tokens computed before the mixed step
    cache = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim)
    attention = make_attention("cpu", cache, c)
    assert CpuPagedAttention.ROW_LIMIT < 35
    tables = [list(range(0, 13)), list(range(13, 22)), list(range(22, 26)), list(range(26, 29))]

    def run(which: list[int], lens: list[int], starts: list[int]) -> torch.Tensor:
        """One step over sequences ``which``; logits of each one's last token."""
        return paged_step(model, cache, attention, seqs, tables, which, lens, starts)

    run([0, 2, 3], [done[i] for i in (0, 2, 3)], [0, 0, 0])  # the cached context
    got = run([0, 1, 2, 3], [len(s) - d for s, d in zip(seqs, done)], done)
    for row, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([s])).logits[0, -1]
        assert torch.allclose(got[row], ref, atol=1e-4), (row, (got[row] - ref).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_decodes_of_different_lengths_match_single_runs(backend):
    hf = tiny_hf("llama3")
    model = LlamaModel.from_hf(hf, from_hf_config(hf.config))
    c = model.config
    cache = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim)
    attention = make_attention(backend, cache, c)
    seqs = [list(range(5, 5 + n)) for n in (3, 10, 7)]
    tables = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    # Prefill all but the last token of each, in one ragged batch, then decode all three at once.
    layout = BatchLayout([len(s) - 1 for s in seqs], [0, 0, 0], tables)
    ids, pos, slots = [], [], []
    for s, t in zip(seqs, tables):
        ids += s[:-1]
        pos += range(len(s) - 1)
        slots += [t[p // 4] * 4 + p % 4 for p in range(len(s) - 1)]
    attention.plan(layout)
    model.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), cache, attention,
                  None, torch.tensor([0]))
    attention.plan(BatchLayout([1, 1, 1], [len(s) - 1 for s in seqs], tables))
    last = [len(s) - 1 for s in seqs]
    got = model.forward(torch.tensor([s[-1] for s in seqs]), torch.tensor(last),
                        torch.tensor([t[p // 4] * 4 + p % 4 for t, p in zip(tables, last)]),
                        cache, attention, None, torch.arange(3))
    for row, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([s])).logits[0, -1]
        assert torch.allclose(got[row], ref, atol=1e-4)


def test_profiles_have_plausible_sizes_and_build_random_weights():
    sizes = {name: p.num_parameters() / 1e9 for name, p in PROFILES.items()}
    assert 0.12 < sizes["smollm2-135m"] < 0.15
    assert 0.45 < sizes["qwen2.5-0.5b"] < 0.55
    assert 7.0 < sizes["qwen2.5-7b"] < 8.0
    assert 7.5 < sizes["llama-3-8b"] < 8.5
    small = profile("smollm2-135m", num_layers=2, vocab_size=50)
    model = LlamaModel.random(small)
    logits = paged_logits(model, [1, 2, 3, 4, 5], [5], block_size=16)
    assert logits.shape == (5, 50) and torch.isfinite(logits).all()
    with pytest.raises(KeyError, match="unknown model profile"):
        profile("gpt-5")


def test_sampling_filters_and_seeds():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    assert sample(logits, [SamplingParams()], [None]) == [1]
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sample(logits, [top1], [torch.Generator().manual_seed(0)]) == [1]
    kept = filter_logits(logits[0], SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(kept).tolist() == [False, True, True, False]
    hot = SamplingParams(temperature=2.0, seed=3)
    draws = [sample(logits.repeat(2, 1), [hot, hot], [torch.Generator().manual_seed(3)] * 2)
             for _ in range(2)]
    assert draws[0] == draws[1]


def test_linear_backends_agree_and_bad_names_fail():
    x, w, b = torch.randn(7, 16), torch.randn(5, 16), torch.randn(5)
    chosen = select_gemm(torch.device("cpu"), torch.float32)
    assert torch.allclose(chosen(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
    assert select_gemm(torch.device("cpu"), torch.float64) is torch.nn.functional.linear
    with pytest.raises(ValueError, match="linear backend must be"):
        select_gemm(torch.device("cpu"), torch.float32, "blas")
