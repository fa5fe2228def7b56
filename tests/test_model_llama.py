"""The paged Llama forward pass against transformers, on tiny random-weight models (no real model)."""

from __future__ import annotations

import pytest
import torch

from runtime.kv_cache import KVCache
from runtime.model.attention import BatchLayout, TorchPagedAttention
from runtime.model.llama import LlamaModel, select_linear
from runtime.model.profiles import PROFILES, from_hf_config, profile
from runtime.model.sampling import filter_logits, sample
from runtime.request import SamplingParams


def tiny_hf(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama3":
        config = LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    return model.eval()


def paged_logits(model: LlamaModel, ids: list[int], chunks: list[int], block_size: int = 4,
                 table: list[int] | None = None) -> torch.Tensor:
    """All-position logits of ``ids`` computed chunk by chunk through a scrambled block table."""
    c = model.config
    cache = KVCache(c.num_layers, 64, block_size, c.num_kv_heads, c.head_dim)
    attention = TorchPagedAttention(cache, c.num_heads, c.num_kv_heads, c.head_dim)
    table = table or [(7 * i + 3) % 64 for i in range(-(-len(ids) // block_size))]
    outs, start = [], 0
    for n in chunks:
        pos = list(range(start, start + n))
        attention.plan(BatchLayout([n], [start], [table]))
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in pos])
        outs.append(model.forward(torch.tensor(ids[start:start + n]), torch.tensor(pos), slots,
                                  cache, attention, None, torch.arange(n)))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_paged_forward_matches_transformers_in_chunks_and_decodes(kind):
    hf = tiny_hf(kind)
    config = from_hf_config(hf.config)
    assert (config.rope_scaling is not None) == (kind == "llama3")
    assert config.qkv_bias == (kind == "qwen2")
    model = LlamaModel.from_hf(hf, config)
    ids = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = paged_logits(model, ids, [9, 6, 1, 1, 6])
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_batched_decodes_of_different_lengths_match_single_runs():
    hf = tiny_hf("llama3")
    model = LlamaModel.from_hf(hf, from_hf_config(hf.config))
    c = model.config
    cache = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim)
    attention = TorchPagedAttention(cache, c.num_heads, c.num_kv_heads, c.head_dim)
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
    chosen = select_linear(torch.device("cpu"), torch.float32)
    assert torch.allclose(chosen(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
    assert select_linear(torch.device("cpu"), torch.float64) is torch.nn.functional.linear
    with pytest.raises(ValueError, match="linear backend must be"):
        select_linear(torch.device("cpu"), torch.float32, "blas")
