"""What structured output costs per token: grammar masks on SmolLM2-135M's 49,152-token vocabulary.

For each grammar (a JSON schema of a person, OpenAI-style tool calls of two tools, a choice of
three words), the matcher walks a reply that fits it, token by token, as the engine does: before
each token it takes the previous token and fills the row's bitmask of allowed tokens (*fill*);
*mask* is the fill and the bitmask's application to a row of logits (every disallowed logit set
to -inf), as :class:`runtime.constrained.GrammarMasks` adds them to a constrained row's sampling
on the CPU (numpy); *xgr_apply* is xgrammar's own CPU kernel for the application alone, for
comparison. The per-token times are printed (median, mean, 95th percentile, max) with the
one-off costs (reading the vocabulary, compiling the grammar). Then the torch engine decodes the same prompt greedily
with and without a schema, alternating, to show the mask's share of a whole decode step::

    python -m experiments.bench_grammar_mask [--repeats 5] [--no-engine] [--quick]

``--quick``: one repeat, masks only, written under ``results/quick/``.

Ends with one JSON line (also ``results/bench_grammar_mask.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from experiments.harness import headline

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "hobbies"]}
TOOLS = [{"type": "function", "function": {"name": "like_post", "parameters": {
              "type": "object", "properties": {"post_id": {"type": "integer"}},
              "required": ["post_id"]}}},
         {"type": "function", "function": {"name": "create_post", "parameters": {
              "type": "object", "properties": {"content": {"type": "string"}},
              "required": ["content"]}}}]


def cases() -> list[tuple[str, Any, str]]:
    """``(name, constraint, a reply that fits it)``."""
    from runtime import Constraint

    return [
        ("json_schema", Constraint.json_schema(PERSON), json.dumps(
            {"name": "Maria Lopez", "age": 34, "hobbies": ["chess", "gardening", "bread"]})),
        ("tool_call", Constraint.tool_call(TOOLS), "<tool_call>\n" + json.dumps(
            {"name": "create_post", "arguments": {"content": "Fresh tomatoes at the market "
                                                  "today, come early!"}}) + "\n</tool_call>"),
        ("choice", Constraint.choice(["buy", "sell", "hold"]), "hold"),
    ]


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_us": round(statistics.median(times) * 1e6, 1),
            "mean_us": round(statistics.fmean(times) * 1e6, 1),
            "p95_us": round(times[int(0.95 * (len(times) - 1))] * 1e6, 1),
            "max_us": round(times[-1] * 1e6, 1)}


def mask_costs(tokenizer: Any, vocab: int, eos: list[int], repeats: int) -> dict[str, Any]:
    """Per-token times of each case: computing the mask (the matcher takes the last token and
    fills the bitmask), applying it to a row of logits, and the two as
    :meth:`~runtime.constrained.GrammarMasks.mask` does them; and the one-off costs."""
    import torch
    import xgrammar as xgr

    from runtime.constrained import GrammarMasks

    start = time.perf_counter()
    masks = GrammarMasks.from_tokenizer(tokenizer, vocab, eos)
    out: dict[str, Any] = {"vocabulary_s": round(time.perf_counter() - start, 3)}
    logits = torch.zeros(1, vocab)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for name, constraint, reply in cases():
        start = time.perf_counter()
        masks.compile(constraint)
        compile_s = time.perf_counter() - start
        ids = tokenizer.encode(reply, add_special_tokens=False) + [eos[0]]
        fill: list[float] = []
        apply: list[float] = []
        total: list[float] = []
        for _ in range(repeats):
            state, mine = masks.state(constraint), masks.state(constraint)
            for n in range(len(ids)):
                start = time.perf_counter()
                state.sync(ids[:n])
                state.matcher.fill_next_token_bitmask(bitmask, 0)
                fill.append(time.perf_counter() - start)
                start = time.perf_counter()
                xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=[0])
                apply.append(time.perf_counter() - start)
                logits.zero_()
                start = time.perf_counter()
                masks.mask(logits, [(0, mine, ids[:n])])
                total.append(time.perf_counter() - start)
                assert logits[0, ids[n]] == 0, f"{name}: token {n} of the reply was masked"
                logits.zero_()
        out[name] = {"tokens": len(ids), "compile_ms": round(compile_s * 1e3, 2),
                     "fill": _summary(fill), "xgr_apply": _summary(apply),
                     "mask": _summary(total)}
        print(f"{name:12s} {len(ids):3d} tokens  compile {compile_s * 1e3:6.2f} ms  per token "
              + "  ".join(f"{part} median {out[name][part]['median_us']:6.1f} us (mean "
                          f"{out[name][part]['mean_us']:6.1f}, max {out[name][part]['max_us']:7.1f})"
                          for part in ("fill", "mask", "xgr_apply")))
    return out


def engine_costs(model: Any, tokenizer: Any, passes: int) -> dict[str, Any]:
    """Seconds per decoded token (after the first) of one greedy request on the torch engine,
    free and under the person schema (alternating, median of ``passes``)."""
    from runtime import Constraint, Request, SamplingParams, build_engine

    engine = build_engine("torch", hf_model=model, tokenizer=tokenizer, kv_cache_tokens=2048)

    def one(constraint: Any) -> float:
        request = Request("a", "Describe Maria, a 34-year-old gardener, as JSON.",
                          sampling=SamplingParams(max_tokens=40, ignore_eos=constraint is None),
                          constraint=constraint)
        engine.submit(request)
        done = []
        while engine.has_work():
            done += engine.step().finished
        c = done[0]
        assert c.first_token_wall is not None and c.output_tokens > 1
        # Decode steps only: the prompt's prefill is the same for both.
        return (c.finish_wall - c.first_token_wall) / (c.output_tokens - 1)

    schema = Constraint.json_schema(PERSON)
    one(None), one(schema)  # warm up (and compile the grammar)
    free, constrained = [], []
    for _ in range(passes):
        free.append(one(None))
        constrained.append(one(schema))
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"torch engine, one greedy request: free {f * 1e3:.2f} ms/token, "
          f"with the schema {c * 1e3:.2f} ms/token ({(c / f - 1) * 100:+.1f}%)")
    return {"free_ms_per_token": round(f * 1e3, 2),
            "schema_ms_per_token": round(c * 1e3, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-engine", action="store_true", help="masks only")
    parser.add_argument("--quick", action="store_true", help="one repeat, masks only")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.no_engine = 1, True
    from runtime.model.loader import load_hf_model

    model, tokenizer = load_hf_model("smollm2-135m")
    vocab = model.get_output_embeddings().weight.shape[0]
    eos = [tokenizer.eos_token_id]
    line: dict[str, Any] = {"experiment": "bench_grammar_mask", "library": "xgrammar",
                            "vocab": vocab, **mask_costs(tokenizer, vocab, eos, args.repeats)}
    if not args.no_engine:
        line["engine"] = engine_costs(model, tokenizer, args.repeats)
    return headline(line, keep_as="bench_grammar_mask", quick=args.quick)


if __name__ == "__main__":
    main()
