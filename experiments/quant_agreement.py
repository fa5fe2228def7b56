"""Next-token agreement of each quantized format with the float32 reference, on many positions.

``tests/test_model_quantized.py`` prints agreement on one 54-token text (one position is 1.9
points); this runs the built-in SmolLM2-135M teacher-forced over several agent personas and
prompts (the benchmark's own texts, about 300 tokens each) and counts, per format, the positions
whose greedy next token equals float32's, the mean relative logit error, and the agreement at
positions where float32's top two logits are more than 1.0 apart (where a flip is a real error,
not a near tie). Every position goes through the format's packed kernels (``dense_from=0``)
unless ``--dense-from`` says otherwise. A format ending in ``+kv8`` keeps its KV as int8 rows
(``runtime.kv_cache_dtype: int8``): every position then attends to quantized keys and values.

    python -m experiments.quant_agreement [--formats int4,int4x8,bf16+kv8,...] [--texts 6]
"""

from __future__ import annotations

import argparse

import torch

from experiments.bench_decode_step import FORMATS
from experiments.bench_peers import CALL_PROMPTS, agent_persona
from runtime.model.llama import LlamaModel
from runtime.model.loader import load_checkpoint
from tests.model_fixtures import paged_logits


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="bf16,int8,int4,int8x8,int4x8,int4x8-f32")
    parser.add_argument("--texts", type=int, default=6)
    parser.add_argument("--dense-from", type=int, default=0)
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint("smollm2-135m", dtype="float32")
    c, tokenizer = checkpoint.config, checkpoint.tokenizer
    texts = [f"{agent_persona(500 + i)} {CALL_PROMPTS[i % len(CALL_PROMPTS)]}"
             for i in range(args.texts)]
    ids = [tokenizer.encode(t) if hasattr(tokenizer, "encode") else tokenizer(t)["input_ids"]
           for t in texts]
    ids = [i[:480] for i in ids]

    def logits(model: LlamaModel, quantized_kv: bool = False) -> list[torch.Tensor]:
        # Chunks of 32: the paged kernel's rows (longer chunks take SDPA), like a decode batch.
        return [paged_logits(model, seq, [32] * (len(seq) // 32) + [len(seq) % 32] * bool(len(seq) % 32),
                             block_size=16, table=list(range(-(-len(seq) // 16))), backend="cpu",
                             quantized_kv=quantized_kv)
                for seq in ids]

    reference = logits(LlamaModel.from_tensors(checkpoint.tensors, c))
    ref = torch.cat(reference)
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) > 1.0
    print(f"{ref.shape[0]} positions over {len(ids)} texts ({int(confident.sum())} where float32's "
          f"top two logits are > 1.0 apart); dense_from {args.dense_from}")
    results = {}
    for name in args.formats.split(","):
        quantization, dtype = FORMATS[name.removesuffix("+kv8")]
        model = LlamaModel.from_tensors(checkpoint.tensors, c, quantization=quantization,
                                        dtype=dtype, dense_from=args.dense_from)
        got = torch.cat(logits(model, quantized_kv=name.endswith("+kv8")))
        same = got.argmax(-1) == ref.argmax(-1)
        error = ((got - ref).abs().max(-1).values / ref.abs().max(-1).values).mean().item()
        results[name] = (same.float().mean().item(), same[confident].float().mean().item(), error)
        print(f"{name:>12}: agreement {results[name][0]:6.1%}, where confident "
              f"{results[name][1]:6.1%}, mean relative logit error {error:.3f}", flush=True)
    return results


if __name__ == "__main__":
    main()
