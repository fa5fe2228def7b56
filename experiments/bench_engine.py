"""The torch engine against the hf baseline on a many-agents, many-adapters workload.

Every agent has its own rank-r LoRA adapter and a ~200-token persona prefix and makes several
calls in a row (its next call is submitted as soon as its previous one finishes, as in a
simulation). Both engines serve the same calls with greedy decoding in one run; the script prints
calls/s and output tokens/s of both, their ratio, how many outputs are identical, and ends with
one JSON line::

    python -m experiments.bench_engine            # 32 agents x 4 calls x 32 tokens
    python -m experiments.bench_engine --quick    # 4 agents x 2 calls: a smoke run

The hf baseline serves one call at a time and keeps nothing between calls but its loaded adapters,
so its calls/s does not depend on how many agents there are. ``--hf-agents K`` lets it serve only
the first K agents' calls (on a slow shared machine the full baseline takes an hour); its rate is
then measured on those calls and outputs are compared on those calls. The printout says so.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from experiments.agent_memory import persona
from experiments.harness import headline, serve_in_turn
from experiments.make_adapters import make_adapters
from runtime import Engine, Request, SamplingParams, build_engine
from runtime.model.profiles import PROFILES
from runtime.model.weights import QUANTIZATIONS


def prompt(call: int) -> str:
    hour = 7 + 3 * call
    return f"It is {hour}:00. What do you do next, and why? Answer in two sentences."


def serve_all(engine: Engine, agents: int, calls: int, max_tokens: int,
              adapters: list[str]) -> tuple[dict[tuple[int, int], str], float, int]:
    """Run every agent's calls (each agent's next call right after its previous one)."""
    def request(agent: int, call: int) -> Request:
        return Request(f"agent{agent}", prompt(call), prefix=persona(agent),
                       adapter=adapters[agent], sampling=SamplingParams(max_tokens=max_tokens))

    texts: dict[tuple[int, int], str] = {}
    tokens = 0
    start = time.perf_counter()
    for agent, call, done in serve_in_turn(engine, agents, calls, request):
        texts[agent, call] = done.text
        tokens += done.output_tokens
    return texts, time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="4 agents x 2 calls x 16 tokens")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for both sides (0: torch's default); on a "
                             "machine shared with other jobs, 1 avoids stalled multi-thread GEMMs")
    parser.add_argument("--linear", choices=("auto", "torch", "onednn"), default="auto",
                        help="the torch engine's GEMM (runtime.model.weights.select_gemm); "
                             "'torch' is F.linear (MKL), as transformers uses on the hf side")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the torch engine's dtype (the hf baseline stays float32)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                        help="the torch engine's weights (runtime/model/weights.py)")
    parser.add_argument("--hf-agents", type=int, default=0,
                        help="hf serves only the first K agents' calls (0: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.calls, args.max_tokens = 4, 2, 16

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    adapters = make_adapters(workdir, PROFILES[args.model], n=args.agents, rank=args.rank)
    print(f"{args.agents} agents x {args.calls} calls x {args.max_tokens} tokens, rank-{args.rank} "
          f"adapters, torch threads {torch.get_num_threads()}, torch engine GEMM {args.linear}, "
          f"{platform.processor() or platform.machine()}")

    results = {}
    hf_agents = args.hf_agents or args.agents
    for name, options in (("hf", {}), ("torch", {"max_lora_rank": args.rank,
                                                  "max_num_seqs": max(args.agents, 1),
                                                  "max_batch_tokens": args.max_batch_tokens,
                                                  "linear": args.linear, "dtype": args.dtype,
                                                  "quantization": args.quantization})):
        engine = build_engine(name, model=args.model, **options)
        agents = hf_agents if name == "hf" else args.agents
        texts, seconds, tokens = serve_all(engine, agents, args.calls, args.max_tokens, adapters)
        n_calls = agents * args.calls
        results[name] = {"texts": texts, "seconds": seconds, "calls_per_s": n_calls / seconds,
                         "tokens_per_s": tokens / seconds}
        print(f"{name:>6}: {n_calls} calls in {seconds:7.1f} s  {n_calls / seconds:7.2f} calls/s  "
              f"{tokens / seconds:8.1f} tokens/s")
        engine.close()
    hf, tt = results["hf"], results["torch"]
    same = sum(hf["texts"][k] == tt["texts"][k] for k in hf["texts"])
    ratio = tt["calls_per_s"] / hf["calls_per_s"]
    print(f" ratio: {ratio:.2f}x calls/s; identical greedy outputs: {same}/{len(hf['texts'])}"
          + (f" (hf measured on the first {hf_agents} agents' calls)" if hf_agents < args.agents
             else ""))
    line = {"ratio": round(ratio, 3), "outputs_identical": same == len(hf["texts"]),
            "identical": same, "calls": len(hf["texts"]), "agents": args.agents,
            "hf_agents": hf_agents, "calls_per_agent": args.calls, "max_tokens": args.max_tokens,
            "rank": args.rank, "threads": torch.get_num_threads(), "linear": args.linear,
            "dtype": args.dtype, "quantization": args.quantization,
            "hf_calls_per_s": round(hf["calls_per_s"], 3),
            "torch_calls_per_s": round(tt["calls_per_s"], 3),
            "hf_tokens_per_s": round(hf["tokens_per_s"], 1),
            "torch_tokens_per_s": round(tt["tokens_per_s"], 1)}
    return headline(line)


if __name__ == "__main__":
    main()
