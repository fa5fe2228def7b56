"""The engine against transformers' batched ``generate`` with peft, on the same batch of agents.

Every agent has its own rank-``r`` LoRA adapter (PEFT format) and a persona of about
``--persona-tokens`` tokens, and makes ``--calls`` calls of ``--max-tokens`` output tokens each
(greedy, end-of-sequence ignored). Both sides run one random-weights model of a built-in profile
(the same weights: the engine reads transformers' tensors) and the same token ids (text as bytes,
:class:`~runtime.model.byte_chat.ByteChat`), so the profile can be a 7B shape on a GPU with no
model files:

* **transformers + peft**: all adapters loaded into one ``PeftModel``; each round of calls is one
  left-padded ``generate`` over every agent, each row with its own adapter (peft's
  ``adapter_names``). It keeps nothing between rounds, so each round prefills every persona again.
* **the engine**: every agent's calls go through :class:`runtime.Engine` as a simulation sends them
  (its next call as soon as its previous one finishes, :func:`experiments.harness.serve_in_turn`),
  with continuous batching, paged KV, the prefix cache and multi-LoRA batching; once per attention
  backend named in ``--attention`` (``torch``, and ``flashinfer`` on CUDA where it imports).

Printed: calls/s and output tokens/s of each side, the engine's speedup, and how many completions
are the same text on both sides (random weights in bfloat16 leave many near-ties between logits,
so greedy texts part after a while there; float32 should agree). Ends with one JSON line::

    python -m experiments.bench_generate --quick                     # CPU smoke run
    python -m experiments.bench_generate --device cuda --dtype bfloat16 --model qwen2.5-7b \\
        --agents 32 --attention torch,flashinfer

Everything here is measured on the machine it runs on; nothing is modeled.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.agent_memory import long_persona, persona, random_adapter
from experiments.bench_engine import prompt
from experiments.harness import headline, serve_in_turn
from runtime import Request, SamplingParams, build_engine
from runtime.model.byte_chat import ByteChat
from runtime.model.profiles import ModelConfig, profile


def hf_config(config: ModelConfig) -> Any:
    """The transformers config of a built-in profile (Qwen2 when it has q/k/v biases)."""
    from transformers import LlamaConfig, Qwen2Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **config.rope_scaling}
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                  rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
                  max_position_embeddings=config.max_position_embeddings,
                  tie_word_embeddings=config.tie_word_embeddings,
                  eos_token_id=list(config.eos_token_ids))
    if config.qkv_bias:
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def random_hf_model(name: str, device: str, dtype: str, seed: int = 0) -> Any:
    """A transformers causal LM of profile ``name`` with random weights, built on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(profile(name)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class Workload:
    """The agents' personas, adapters and calls, and their token ids (both sides use these)."""

    def __init__(self, config: ModelConfig, agents: int, calls: int, max_tokens: int,
                 persona_tokens: int, rank: int, work: Path) -> None:
        self.agents, self.calls, self.max_tokens = agents, calls, max_tokens
        self.personas = [long_persona(persona(i), 0)[:persona_tokens].ljust(persona_tokens, ".")
                         for i in range(agents)]
        self.adapters = [random_adapter(work / f"adapter{i}", config, rank, i)
                         for i in range(agents)]
        self.chat = ByteChat(config.vocab_size, config.eos_token_ids)

    def request(self, agent: int, call: int) -> Request:
        return Request(f"agent{agent}", prompt(call), prefix=self.personas[agent],
                       adapter=self.adapters[agent],
                       sampling=SamplingParams(max_tokens=self.max_tokens, ignore_eos=True))

    def ids(self, agent: int, call: int) -> list[int]:
        prefix, rest = self.chat.encode(self.personas[agent], prompt(call))
        return prefix + rest


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_transformers(hf: Any, load: Workload, device: str) -> tuple[dict, float]:
    """Every round of calls as one batched ``generate`` with per-row adapters."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf, load.adapters[0], adapter_name="a0")
    for i, path in enumerate(load.adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    names = [f"a{i}" for i in range(load.agents)]

    def generate(rows: list[list[int]], new: int) -> list[list[int]]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, adapter_names=names[:len(rows)])
        return out[:, width:].tolist()

    generate([load.ids(i, 0)[:8] for i in range(min(2, load.agents))], 2)  # warm-up
    _sync(device)
    texts: dict[tuple[int, int], str] = {}
    start = time.perf_counter()
    for call in range(load.calls):
        outputs = generate([load.ids(a, call) for a in range(load.agents)], load.max_tokens)
        for agent, tokens in enumerate(outputs):
            texts[agent, call] = load.chat.decode(tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    return texts, seconds


def run_engine(hf: Any, model: str, load: Workload, device: str, dtype: str, attention: str,
               max_batch_tokens: int) -> tuple[dict, float]:
    """Every agent's calls in turn through the engine, transformers' weights shared."""
    context = max(len(load.ids(a, c)) for a in range(load.agents) for c in range(load.calls))
    engine = build_engine("torch", model=model, device=device, dtype=dtype, hf_model=hf,
                          attention=attention, max_num_seqs=max(load.agents, 8),
                          max_batch_tokens=max_batch_tokens, max_lora_rank=64,
                          kv_cache_tokens=load.agents * load.calls * (context + load.max_tokens)
                          + 4096)
    try:
        warm = Request("warm", "hello", sampling=SamplingParams(max_tokens=2, ignore_eos=True))
        list(serve_in_turn(engine, 1, 1, lambda a, c: warm))
        _sync(device)
        texts: dict[tuple[int, int], str] = {}
        start = time.perf_counter()
        for agent, call, done in serve_in_turn(engine, load.agents, load.calls, load.request):
            texts[agent, call] = done.text
        _sync(device)
        return texts, time.perf_counter() - start
    finally:
        engine.close()


def bench(model: str, device: str, dtype: str, agents: int, calls: int, max_tokens: int,
          persona_tokens: int, rank: int, attention: list[str],
          max_batch_tokens: int) -> dict[str, Any]:
    """One comparison; returns its row (rates, speedups, agreement)."""
    config = profile(model)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as work:
        load = Workload(config, agents, calls, max_tokens, persona_tokens, rank, Path(work))
        hf = random_hf_model(model, device, dtype)
        n_calls, n_tokens = agents * calls, agents * calls * max_tokens
        row: dict[str, Any] = {"model": model, "device": device, "dtype": dtype, "agents": agents,
                               "calls": n_calls, "max_tokens": max_tokens,
                               "prompt_tokens": len(load.ids(0, 0)), "rank": rank}
        sides: dict[str, tuple[dict, float]] = {}
        for backend in attention:
            sides[f"engine_{backend}"] = run_engine(hf, model, load, device, dtype, backend,
                                                    max_batch_tokens)
        # Last: peft wraps the model's layers in place.
        sides["transformers"] = run_transformers(hf, load, device)
        reference = sides["transformers"][0]
        for name, (texts, seconds) in sides.items():
            row[f"{name}_calls_s"] = round(n_calls / seconds, 2)
            row[f"{name}_tokens_s"] = round(n_tokens / seconds, 1)
            if name != "transformers":
                row[f"{name}_speedup"] = round(sides["transformers"][1] / seconds, 2)
                row[f"{name}_same_text"] = sum(texts[k] == reference[k] for k in reference)
        del hf, sides
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in profile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--agents", default="8", help="comma-separated batch sizes")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--persona-tokens", type=int, default=600)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attention", default="torch",
                        help="comma-separated engine attention backends (torch, flashinfer, cpu)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="2 agents x 2 calls x 4 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.calls, args.max_tokens, args.persona_tokens = "2", 2, 4, 64
    rows = []
    for agents in (int(a) for a in args.agents.split(",")):
        row = bench(args.model, args.device, args.dtype, agents, args.calls, args.max_tokens,
                    args.persona_tokens, args.rank, args.attention.split(","),
                    args.max_batch_tokens)
        print(row, flush=True)
        rows.append(row)
    headline({"experiment": "bench_generate", "rows": rows}, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
