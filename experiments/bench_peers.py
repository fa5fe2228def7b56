"""ScaleSim's engine against llama.cpp's ``llama-server`` on the same model, the same token ids.

Each of N agents (1, 8, 32) has its own persona of about 240 tokens and makes several calls of a
fixed number of greedy tokens (EOS ignored), its next call as soon as its previous one returns, as
in a simulation. ScaleSim serves them in process (the torch engine: continuous batching, paged KV,
persona KV reuse); llama-server serves them over loopback with continuous batching, one slot per
agent and ``cache_prompt`` (it keeps each slot's last prompt). Both get the token ids ScaleSim's
chat template makes, and both run on the machine's cores (``--threads``). Every agent count is
run in alternating passes (ScaleSim, llama-server, ScaleSim, ...), each pass with fresh personas so
neither engine starts warm, and the medians are compared. Then one long prompt measures
single-stream prefill and decode speed the same way, and a batch-32 decode step of ScaleSim is
timed to report its achieved GFLOP/s and GB/s against the machine's measured peaks.

    make bench-peers                                  # builds llama-server once, then runs this
    python -m experiments.bench_peers --llama-server PATH [--passes 3] [--quantization int4x8]
    python -m experiments.bench_peers --quick --no-llama    # smoke run of the ScaleSim side

The built-in model file is SmolLM2-135M-Instruct in GGUF ``Q4_1`` (token embedding ``Q8_0``);
llama-server reads it as it is. ScaleSim's default here is ``--quantization int4x8`` (the same
4-bit codes and the embedding's 8-bit ones, times activations quantized to int8 per block of 32:
llama.cpp's own arithmetic); ``--quantization int4`` is the weight-only format with bfloat16
activations that it used before, ``--dtype float32 --quantization none`` the reference.
Prints a table and ends with one JSON line (also written to ``results/bench_peers.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import torch

from experiments.agent_memory import persona
from experiments.harness import alternating, headline, machine_peaks, serve_in_turn
from experiments.results_dir import results_dir
from runtime import Engine, Request, SamplingParams, build_engine
from runtime.executors.torch import TorchExecutor
from runtime.interface import EngineEvent, StepTimed
from runtime.kv_cache import KV_CACHE_DTYPES
from runtime.model.weights import QUANTIZATIONS

CALL_PROMPTS = [
    "It is 7:00. What do you do first this morning, and why? Answer in two sentences.",
    "It is 10:00 and a neighbour asks for help. What do you say? Answer in two sentences.",
    "It is 13:00. Where do you eat lunch, and with whom? Answer in two sentences.",
    "It is 16:00 and it starts to rain. What do you change in your plans? Answer briefly.",
]
EXTRA = ("In the evenings you write in your notebook what you promised, to whom, and by when, "
         "and you read the previous day's page before you sleep.")


def agent_persona(number: int) -> str:
    """About 240 tokens of persona, different for every agent number."""
    return f"{persona(number)} {EXTRA}"


@dataclass
class Call:
    """One finished call, as either engine saw it."""

    agent: int
    latency_s: float
    ttft_s: float
    output_ids: list[int] = field(default_factory=list)


@dataclass
class Pass:
    engine: str
    agents: int
    wall_s: float
    calls: list[Call]

    @property
    def calls_per_s(self) -> float:
        return len(self.calls) / self.wall_s

    def tokens_per_s(self, max_tokens: int) -> float:
        return len(self.calls) * max_tokens / self.wall_s


def workload(agents: int, first_agent: int, calls: int) -> list[list[tuple[str, str]]]:
    """Per agent, its calls as (persona, prompt) texts."""
    return [[(agent_persona(first_agent + a), CALL_PROMPTS[c % len(CALL_PROMPTS)])
             for c in range(calls)] for a in range(agents)]


# -- ScaleSim ---------------------------------------------------------------------------------

def scalesim_pass(engine: Engine, work: list[list[tuple[str, str]]], max_tokens: int,
                  tag: str) -> Pass:
    """Serve every agent's calls, each agent's next call right after its previous one."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def request(agent: int, call: int) -> Request:
        prefix, prompt = work[agent][call]
        return Request(f"{tag}-{agent}", prompt, prefix=prefix, sampling=sampling)

    done: list[Call] = []
    start = time.perf_counter()
    for agent, _, completion in serve_in_turn(engine, len(work), len(work[0]), request):
        first = completion.first_token_wall or completion.finish_wall
        done.append(Call(agent, completion.finish_wall - completion.submit_wall,
                         first - completion.submit_wall))
    return Pass("scalesim", len(work), time.perf_counter() - start, done)


def scalesim_single(engine: Engine, prefix: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """Prefill and decode tokens/s of one request alone."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    (_, _, completion), = serve_in_turn(engine, 1, 1, lambda agent, call: Request(
        "single", prompt, prefix=prefix, sampling=sampling))
    assert completion.first_token_wall is not None
    prefill_s = completion.first_token_wall - completion.submit_wall
    decode_s = completion.finish_wall - completion.first_token_wall
    return (completion.prompt_tokens / prefill_s, (completion.output_tokens - 1) / decode_s,
            completion.prompt_tokens)


def decode_step_rates(engine: Engine, batch: int, kv_token_bytes: int,
                      weight_bytes: Callable[[int, int], int],
                      max_tokens: int = 48) -> dict[str, float]:
    """Time forward passes while ``batch`` sequences decode together; achieved GFLOP/s and GB/s.

    Each sequence decodes one token a step, EOS ignored, from its prefill to its
    ``max_tokens``-th token; the steps in which all ``batch`` decode are timed (up to 12). The
    KV a timed step reads, the sequences' tokens before it, follows from their prompt lengths
    and the step each one finished in. ``weight_bytes(tokens, sampled)`` is what the model's
    projections read in a step of ``tokens`` tokens.
    """
    config = engine.architecture()
    assert config is not None
    timed_steps: list[StepTimed] = []

    def note(event: EngineEvent) -> None:
        if isinstance(event, StepTimed):
            timed_steps.append(event)

    engine.listen(note)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompt_tokens: dict[int, int] = {}
    for a in range(batch):
        prefix = agent_persona(10_000 + a)
        request_id = engine.submit(Request(f"step-{a}", CALL_PROMPTS[0], prefix=prefix,
                                           sampling=sampling))
        prompt_tokens[request_id] = engine.prompt_tokens(prefix, CALL_PROMPTS[0])
    timed: list[tuple[int, float]] = []  # (iteration, forward-pass seconds)
    finished_in: dict[int, int] = {}
    iteration = 0
    while engine.has_work():
        before = len(timed_steps)
        result = engine.step()
        iteration += 1
        ran = timed_steps[before:]
        if (ran and ran[0].sequences == batch and ran[0].prefill_tokens == 0
                and not finished_in and len(timed) < 12):
            timed.append((iteration, ran[0].wall_s))
        for done in result.finished:
            finished_in[done.request_id] = iteration
    step_s = statistics.median(s for _, s in timed)
    # Before iteration i a sequence that finished in iteration f holds max_tokens - 1 - (f - i)
    # of its output tokens.
    context = statistics.median(
        sum(prompt_tokens[r] + max_tokens - 1 - (f - i) for r, f in finished_in.items())
        for i, _ in timed)
    c = config
    params = sum(c.num_layers * n for n in (
        c.hidden_size * (c.q_size + 2 * c.kv_size), c.q_size * c.hidden_size,
        2 * c.hidden_size * c.intermediate_size, c.intermediate_size * c.hidden_size)
    ) + c.vocab_size * c.hidden_size
    attention_flops = 4 * context * c.num_heads * c.head_dim * c.num_layers
    kv_bytes = context * kv_token_bytes
    weights = weight_bytes(batch, batch)
    return {"step_ms": step_s * 1e3, "batch": batch, "context_tokens": context,
            "gflops": (2 * params * batch + attention_flops) / step_s / 1e9,
            "gbps": (weights + kv_bytes) / step_s / 1e9,
            "weight_mb": weights / 1e6, "kv_mb": kv_bytes / 1e6}


# -- llama-server -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``llama-server`` on loopback with ``slots`` parallel slots, started and stopped here."""

    def __init__(self, binary: str, gguf: Path, slots: int, ctx_per_slot: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(results_dir(True) / f"llama-server-{slots}.log", "w")
        self.process = subprocess.Popen(
            [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
             "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads),
             "-tb", str(threads), "-cb", "--cache-prompt", "-ngl", "0"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(timeout=600)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see "
                                   f"{self.log.name}")
            try:
                if self.client.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy; see {self.log.name}")
            time.sleep(0.2)

    def complete(self, ids: list[int], max_tokens: int) -> tuple[Call, dict]:
        """One streamed completion of ``ids``: latency, time to first token, output ids.

        A new connection per call: a kept-alive one was seen closed under a later request."""
        body = {"prompt": ids, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                "ignore_eos": True, "cache_prompt": True, "stream": True, "return_tokens": True}
        start = time.perf_counter()
        first = None
        tokens: list[int] = []
        last: dict = {}
        with httpx.Client(timeout=600) as client, \
                client.stream("POST", f"{self.url}/completion", json=body) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if first is None and (event.get("tokens") or event.get("content")):
                    first = time.perf_counter()
                tokens += event.get("tokens") or []
                last = event
        end = time.perf_counter()
        return Call(-1, end - start, (first or end) - start, tokens), last

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def llama_pass(server: LlamaServer, work_ids: list[list[list[int]]], max_tokens: int) -> Pass:
    """Every agent a thread that makes its calls one after another."""
    done: list[Call] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def agent(a: int) -> None:
        try:
            for ids in work_ids[a]:
                call, _ = server.complete(ids, max_tokens)
                call.agent = a
                with lock:
                    done.append(call)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(a,)) for a in range(len(work_ids))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"llama-server: {errors[0]!r}")
    return Pass("llama-server", len(work_ids), time.perf_counter() - start, done)


# -- the run ----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(passes: list[Pass], max_tokens: int) -> dict[str, float]:
    latencies = [c.latency_s for p in passes for c in p.calls]
    ttfts = [c.ttft_s for p in passes for c in p.calls]
    return {"calls_per_s": statistics.median(p.calls_per_s for p in passes),
            "tokens_per_s": statistics.median(p.tokens_per_s(max_tokens) for p in passes),
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "ttft_p50_s": percentile(ttfts, 0.5), "passes": len(passes)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="path of a llama-server binary (make bench-peers builds one)")
    parser.add_argument("--no-llama", action="store_true", help="the ScaleSim side only")
    parser.add_argument("--agents", default="1,8,32", help="agent counts, comma-separated")
    parser.add_argument("--calls", type=int, default=4, help="calls per agent")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3, help="alternating passes per count")
    parser.add_argument("--threads", type=int, default=0, help="threads of both (0: all cores)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--quantization", default="int4x8", choices=QUANTIZATIONS)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="ScaleSim's KV pool: the model's dtype (auto) or int8 rows")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 2 agents, 2 calls of 8 tokens, one pass")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.calls, args.max_tokens, args.passes = "1,2", 2, 8, 1
    counts = [int(n) for n in args.agents.split(",")]
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if not args.no_llama and not args.llama_server:
        parser.error("--llama-server PATH (or LLAMA_SERVER) is needed unless --no-llama")

    from runtime.model.loader import BUILTIN_GGUF, builtin_gguf

    gguf = builtin_gguf(next(iter(BUILTIN_GGUF)))
    engine = build_engine("torch", dtype=args.dtype, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=max(counts),
                          max_batch_tokens=512)
    # What this benchmark needs of the torch engine beyond its interface, taken in this one
    # place: its chat codec, because llama-server must get the very token ids ScaleSim computes
    # on, and its model's count of the weight bytes a step reads (quantized codes, or the dense
    # copy a large step uses), for the achieved GB/s of a decode step.
    executor = engine.executor
    assert isinstance(executor, TorchExecutor)
    chat, model = executor.chat, executor.model
    print(f"model {gguf.name}; ScaleSim torch engine {args.dtype}, quantization "
          f"{args.quantization}, KV {args.kv_cache_dtype}; {threads} threads each; {args.calls} calls x {args.max_tokens} "
          f"tokens per agent, EOS ignored; {args.passes} alternating passes", flush=True)
    # Warm both: the first steps of an engine pay one-time costs (kernel build, allocations).
    scalesim_pass(engine, workload(2, 90_000, 1), 4, "warm")

    rows: dict[int, dict[str, dict[str, float]]] = {}
    next_agent = 0
    for n in counts:
        server = None if args.no_llama else LlamaServer(args.llama_server, gguf, n, 512, threads)
        try:
            if server is not None:
                ids = sum(chat.encode(*workload(1, 95_000, 1)[0][0]), [])
                server.complete(ids, 4)  # warm-up
            runs: dict[str, list[Pass]] = {"scalesim": [], "llama-server": []}
            for p, order in enumerate(alternating(args.passes, ["scalesim", "llama-server"])):
                work = workload(n, next_agent, args.calls)
                next_agent += n
                for name in order:
                    if name == "scalesim":
                        runs[name].append(scalesim_pass(engine, work, args.max_tokens, f"p{p}"))
                    elif server is not None:
                        work_ids = [[sum(chat.encode(prefix, prompt), []) for prefix, prompt in agent]
                                    for agent in work]
                        runs[name].append(llama_pass(server, work_ids, args.max_tokens))
                rates = "  ".join(f"{r[-1].engine} {r[-1].calls_per_s:.3f} calls/s"
                                  for r in runs.values() if r)
                print(f"  {n} agents, pass {p + 1}: {rates}", flush=True)
            rows[n] = {name: summarize(r, args.max_tokens) for name, r in runs.items() if r}
        finally:
            if server is not None:
                server.close()

    single_prefix = " ".join(agent_persona(80_000 + i) for i in range(2))
    single_prompt = "Tell the story of the town's spring fair in detail."
    single: dict[str, list[tuple[float, float]]] = {"scalesim": [], "llama-server": []}
    server = None if args.no_llama else LlamaServer(args.llama_server, gguf, 1, 1024, threads)
    try:
        for p, order in enumerate(alternating(args.passes, ["scalesim", "llama-server"])):
            # The take's mark goes first: the prompts then share no whole KV block, and the
            # prefix cache cannot turn the prefill of a later take into a lookup.
            prefix = f"(Take {p}.) {single_prefix}"
            for name in order:
                if name == "scalesim":
                    prefill, decode, _ = scalesim_single(engine, prefix, single_prompt,
                                                         4 * args.max_tokens)
                    single[name].append((prefill, decode))
                elif server is not None:
                    ids = sum(chat.encode(prefix, single_prompt), [])
                    _, last = server.complete(ids, 4 * args.max_tokens)
                    timing = last.get("timings", {})
                    single[name].append((timing.get("prompt_per_second", float("nan")),
                                         timing.get("predicted_per_second", float("nan"))))
    finally:
        if server is not None:
            server.close()

    kv_token_bytes = executor.cache.block_nbytes // executor.cache.block_size
    step = decode_step_rates(engine, min(32, max(counts)), kv_token_bytes, model.step_weight_bytes)
    peaks = machine_peaks()
    engine.close()

    print(f"\n{'agents':>6} {'engine':>13} {'calls/s':>8} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'TTFT p50':>9}")
    for n, by in rows.items():
        for name, s in by.items():
            print(f"{n:>6} {name:>13} {s['calls_per_s']:8.3f} {s['tokens_per_s']:7.1f} "
                  f"{s['p50_s']:7.2f} {s['p99_s']:7.2f} {s['ttft_p50_s']:9.3f}")
        if "llama-server" in by:
            print(f"{'':>6} {'ratio':>13} {by['scalesim']['calls_per_s'] / by['llama-server']['calls_per_s']:8.2f}x")
    medians = {name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
               for name, v in single.items() if v}
    for name, (prefill, decode) in medians.items():
        print(f"single stream {name:>13}: prefill {prefill:7.1f} tok/s, decode {decode:6.1f} tok/s")
    compute_peak = peaks["gflops_float32" if args.dtype == "float32" else "gflops_bfloat16"]
    print(f"batch-{step['batch']} decode step: {step['step_ms']:.1f} ms, {step['gflops']:.0f} GFLOP/s "
          f"of {compute_peak:.0f} peak ({step['gflops'] / compute_peak:.0%}), {step['gbps']:.1f} "
          f"GB/s of {peaks['mem_gbps']:.1f} copy peak ({step['gbps'] / peaks['mem_gbps']:.0%}); "
          f"weights {step['weight_mb']:.0f} MB + KV {step['kv_mb']:.0f} MB per step")

    line: dict = {"experiment": "bench_peers", "dtype": args.dtype,
                  "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                  "threads": threads,
                  "passes": args.passes, "calls_per_agent": args.calls,
                  "max_tokens": args.max_tokens}
    for n, by in rows.items():
        line[f"scalesim_calls_per_s_{n}"] = round(by["scalesim"]["calls_per_s"], 3)
        if "llama-server" in by:
            line[f"llamacpp_calls_per_s_{n}"] = round(by["llama-server"]["calls_per_s"], 3)
            line[f"vs_llamacpp_{n}"] = round(
                by["scalesim"]["calls_per_s"] / by["llama-server"]["calls_per_s"], 3)
    line["scalesim_prefill_tok_s"], line["scalesim_decode_tok_s"] = (
        round(x, 1) for x in medians["scalesim"])
    if "llama-server" in medians:
        line["llamacpp_prefill_tok_s"], line["llamacpp_decode_tok_s"] = (
            round(x, 1) for x in medians["llama-server"])
        line["decode_vs_llamacpp"] = round(medians["scalesim"][1] / medians["llama-server"][1], 3)
        line["prefill_vs_llamacpp"] = round(medians["scalesim"][0] / medians["llama-server"][0], 3)
    line.update({f"step{step['batch']}_{k}": round(v, 2) for k, v in step.items()
                 if k not in ("batch",)})
    line.update({f"peak_{k}": round(v, 1) for k, v in peaks.items()})
    return headline(line, keep_as="bench_peers", quick=args.quick)


if __name__ == "__main__":
    main()
