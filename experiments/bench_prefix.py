"""What the token-level prefix cache saves on a world of growing conversations, side by side.

The salon world (``worlds/salon.py``): guests share long house rules, keep their own persona and
send their whole conversation with every call. Six variants run the same world and seed:

=============== ===============================================================================
no reuse        policy ``none``: nothing is kept between calls, every prompt is computed in full
persona only    ``runtime.prefix_cache: persona``: only each call's persona is cached (the reuse
                the engine had before the token-level cache), ``lru``
tokens + lru    the token-level cache, evicting least recently used segments (what SGLang does)
tokens+scalesim the token-level cache under the distance policy (evict farthest, prefetch nearest)
tokens+belady   the same with exact distances: the call order of the ``tokens + lru`` run (every
                policy makes the same calls), the offline bound on what any eviction order buys
unbounded       the token-level cache with no budget: the ideal
=============== ===============================================================================

The budgeted variants get a quarter of the cached KV the unbounded run ends with (its working
set) unless ``--budget-fraction`` says otherwise. For each: prompt tokens, prompt tokens
computed (not reused), the share reused, and the makespan; for the unbounded run also its
computed tokens over what an independent count says an ideal cache would compute
(:class:`IdealReuse`), (modeled seconds on the cost model, or
wall seconds on the real engine with ``--real``). Two modeled settings: ``rounds`` (every guest
speaks every round: large batches, where prefill dominates), ``sparse rounds`` (a fifth of the
guests in each round, as in the paper's setting) and ``continuous`` (exponential gaps: the
engine sees one or two sequences at a time). The JSON headline holds the ratios.

    python -m experiments.bench_prefix [--quick] [--real]

``--settings continuous --durations 0,1,5`` runs the named settings with calls that take that
much simulated time (``sim.call_duration``, minutes): the continuous setting starves the
engine at duration 0, and a duration lets it batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.harness import headline
from experiments.results_dir import results_dir
from scalesim import simulate

VARIANTS: dict[str, dict[str, Any]] = {
    "no reuse": {"runtime__memory__policy": "none"},
    "persona only": {"runtime__prefix_cache": "persona", "runtime__memory__policy": "lru"},
    "tokens + lru": {"runtime__memory__policy": "lru"},
    "tokens + scalesim": {"runtime__memory__policy": "scalesim"},
    "tokens + belady": {"runtime__memory__policy": "belady"},
    "unbounded": {"runtime__memory__policy": "unlimited"},
}
BUDGETED = ("persona only", "tokens + lru", "tokens + scalesim", "tokens + belady")


class IdealReuse:
    """What an unbounded cache of every earlier prompt could at best reuse, found by a method
    independent of the tree: each request's input as a chain of block hashes; a request reuses
    the longest chain some earlier request's input also had (full blocks, at least one token
    left to compute), on the token ids ``chat`` gives (the engine's own tokenization).

    It wraps ``engine.submit`` to see the requests; outputs are not counted (a modeled reply is
    placeholder ids that no later prompt contains)."""

    def __init__(self, engine: Any, chat: Any, block_size: int) -> None:
        self.chat, self.block_size = chat, block_size
        self.seen: set[int] = set()
        self.reusable = 0
        submit = engine.submit

        def recording(request: Any) -> int:
            self.add(request)
            return submit(request)

        engine.submit = recording

    def add(self, request: Any) -> None:
        prefix, prompt = self.chat.encode(request.prefix, request.prompt, request.history)
        ids, bs = prefix + prompt, self.block_size
        chain, best = hash(request.adapter), 0
        for k in range(len(ids) // bs):
            chain = hash((chain, tuple(ids[k * bs:(k + 1) * bs])))
            if chain in self.seen and k < (len(ids) - 1) // bs:
                best = k + 1
            self.seen.add(chain)
        self.reusable += best * bs


def run_variant(yaml: str, out: Path, overrides: dict[str, Any],
                ideal: bool = False) -> dict[str, Any]:
    """One run; its token counts, makespan and memory totals (``ideal``: and the tokens an
    unbounded cache of every earlier prompt could reuse, see :class:`IdealReuse`)."""
    from scalesim.assembly import assemble_engine
    from scalesim.config import load_config

    config = load_config(yaml, {k.replace("__", "."): v for k, v in overrides.items()})
    engine = assemble_engine(config.runtime, source=config.source)
    probe = None
    if ideal:
        from runtime.executors.modeled.chat import LengthChat

        if config.runtime.executor != "modeled":
            raise SystemExit("the ideal is computed on the modeled tokenization only")
        m = config.runtime.modeled
        probe = IdealReuse(engine, LengthChat(m.chars_per_token, m.prefix_tokens),
                           config.runtime.block_size)
    start = time.perf_counter()
    result = simulate(config, out=out, engine=engine)
    wall = time.perf_counter() - start
    s = result.summary
    modeled = s.get("modeled", {})
    prompt, cached = int(s["prompt_tokens"]), int(s["cached_tokens"])
    return {"calls": int(s["calls"]), "prompt_tokens": prompt, "computed_tokens": prompt - cached,
            "reused_share": round(cached / prompt, 4) if prompt else 0.0,
            "makespan_s": round(modeled["modeled_makespan_s"], 3) if modeled else round(wall, 2),
            "stall_s": round(modeled.get("modeled_stall_s", s["memory"].get("stall_s", 0.0)), 3),
            "cached_kv_bytes": int(s["memory"].get("device_used_bytes") or 0),
            "evictions": int(s["memory"].get("evictions", 0)),
            **({"ideal_computed_tokens": prompt - probe.reusable} if probe else {})}


def run_dir(work: Path, setting: str, variant: str) -> Path:
    """Where one variant of one setting writes its run (``belady`` reads ``lru``'s trace)."""
    return work / setting / variant.replace(" ", "_")


def compare(name: str, yaml: str, params: dict[str, Any], fraction: float,
            host_bytes: int | None, work: Path, ideal: bool = True,
            duration: float = 0.0) -> dict[str, Any]:
    """Every variant on one setting (calls of ``duration``); the unbounded run first, since it
    sizes the budget."""
    rows: dict[str, dict[str, Any]] = {}
    base = {f"world__params__{k}": v for k, v in params.items()}
    base["sim__call_duration"] = duration
    rows["unbounded"] = run_variant(yaml, run_dir(work, name, "unbounded"),
                                    {**base, **VARIANTS["unbounded"]}, ideal=ideal)
    budget = max(1, int(rows["unbounded"]["cached_kv_bytes"] * fraction))
    for variant, overrides in VARIANTS.items():
        if variant == "unbounded":
            continue
        extra = dict(overrides)
        if variant in BUDGETED:
            extra.update(runtime__memory__device_bytes=budget,
                         runtime__memory__host_bytes=host_bytes)
        if variant == "tokens + belady":
            extra["runtime__memory__belady_trace"] = str(run_dir(work, name, "tokens + lru"))
        rows[variant] = run_variant(yaml, run_dir(work, name, variant), {**base, **extra})
    for variant, row in rows.items():
        print(f"{name:22s} {variant:18s} calls {row['calls']:6d} prompt {row['prompt_tokens']:9d}"
              f" computed {row['computed_tokens']:9d} reused {row['reused_share']:6.1%} "
              f"makespan {row['makespan_s']:9.2f} s", flush=True)
    span = {v: r["makespan_s"] for v, r in rows.items()}
    computed = {v: r["computed_tokens"] for v, r in rows.items()}
    unbounded = rows["unbounded"]
    if "ideal_computed_tokens" in unbounded:
        print(f"{name:22s} ideal (every earlier prompt kept, independent count): computed "
              f"{unbounded['ideal_computed_tokens']}", flush=True)
    return {"budget_bytes": budget, "working_set_bytes": rows["unbounded"]["cached_kv_bytes"],
            "rows": rows,
            **({"unbounded_computed_over_ideal": round(
                unbounded["computed_tokens"] / max(1, unbounded["ideal_computed_tokens"]), 4)}
               if "ideal_computed_tokens" in unbounded else {}),
            "scalesim_vs_lru": round(span["tokens + lru"] / span["tokens + scalesim"], 3),
            "belady_vs_lru": round(span["tokens + lru"] / span["tokens + belady"], 3),
            "unbounded_vs_lru": round(span["tokens + lru"] / span["unbounded"], 3),
            "scalesim_vs_persona_only": round(span["persona only"] / span["tokens + scalesim"],
                                              3),
            "scalesim_vs_no_reuse": round(span["no reuse"] / span["tokens + scalesim"], 3),
            "computed_share_lru": round(computed["tokens + lru"] / rows["no reuse"]
                                        ["prompt_tokens"], 4),
            "computed_share_persona_only": round(computed["persona only"] / rows["no reuse"]
                                                 ["prompt_tokens"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke test)")
    parser.add_argument("--real", action="store_true",
                        help="also the small world on the real model (CPU, minutes)")
    parser.add_argument("--guests", type=int, default=200)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--settings", default="rounds,sparse rounds,continuous",
                        help="comma-separated, of: rounds, sparse rounds, continuous")
    parser.add_argument("--durations", default="0",
                        help="comma-separated call durations in minutes (sim.call_duration)")
    parser.add_argument("--tiers", default="dropped,host",
                        help="where evicted segments go: dropped, host (a 64 GB host tier)")
    args = parser.parse_args()
    guests = 12 if args.quick else args.guests
    settings = {"rounds": {"guests": guests, "synchronous": True},
                "sparse rounds": {"guests": guests, "synchronous": True, "participation": 0.2,
                                  "gap_minutes": 10},
                "continuous": {"guests": guests}}
    chosen = [name.strip() for name in args.settings.split(",")]
    unknown = [name for name in chosen if name not in settings]
    if unknown:
        parser.error(f"--settings: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(settings)}")
    tiers = {"dropped": 0, "host": None}
    if any(t not in tiers for t in args.tiers.split(",")):
        parser.error(f"--tiers: choose from {', '.join(tiers)}")
    durations = [float(d) for d in args.durations.split(",")]
    # A selection is kept apart from the whole benchmark's results, not written over them.
    whole = (chosen == list(settings) and durations == [0.0]
             and args.tiers.split(",") == list(tiers))
    keep_as = "bench_prefix" if whole else "bench_prefix_selected"
    line: dict[str, Any] = {"experiment": "bench_prefix", "world": "salon",
                            "budget_fraction": args.budget_fraction}
    with tempfile.TemporaryDirectory(prefix="bench_prefix_") as tmp:
        work = Path(tmp)
        modeled = {}
        for name in chosen:
            for duration in durations:
                for tier in args.tiers.split(","):
                    label = f"{name}, evicted {tier}" + (f", duration {duration:g}"
                                                         if duration else "")
                    modeled[label] = compare(label, "worlds/salon_large.yaml",
                                             {**settings[name],
                                              "remarks": 4 if args.quick else 12},
                                             args.budget_fraction, tiers[tier], work,
                                             duration=duration)
        line["modeled"] = {k: {key: v[key] for key in v if key != "rows"}
                           for k, v in modeled.items()}
        line["modeled_label"] = "modeled: qwen2.5-7b on H100, makespans in modeled seconds"
        if args.real:
            line["real"] = compare("real (smollm2, cpu)", "worlds/salon.yaml", {},
                                   args.budget_fraction, 0, work, ideal=False)
            line["real"].pop("rows")
        (results_dir(args.quick) / f"{keep_as}_rows.json").write_text(json.dumps(
            {k: v["rows"] for k, v in modeled.items()}, indent=1) + "\n")
    headline(line, keep_as=keep_as, quick=args.quick)


if __name__ == "__main__":
    main()
