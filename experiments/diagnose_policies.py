"""Diagnose memory policies on the modeled engine: misses, evictions and regret against MIN.

For each policy it runs one world (:func:`experiments.modeled_sim.run_world`) and records every
object access, eviction and install of the memory manager. An eviction is *regretted* when some
other candidate it could have evicted instead is used later than the evicted object (what
Belady's MIN would have chosen). A *wasted prefetch* is evicted again before its next use.
With ``--verbose``, the first regretted evictions are printed with the distance oracle's view of
both agents (``pend``ing call, exact ``timer``, ``recv``/``wait_for`` deadline, ``graph``
estimate, ``hint``, ``turn``, and the resulting ``eta``), and regretted evictions are counted by
what set the evicted agent's estimate. Every number is modeled, except ``wall``.

    python -m experiments.diagnose_policies town 32 --budget 0.25 --until 1440 -v
    python -m experiments.diagnose_policies social_feed 1000 --policies lru,scalesim
"""

from __future__ import annotations

import argparse
import bisect
import collections
import math
import time
from typing import Any

from experiments import modeled_sim
from runtime.memory.manager import MemoryManager

SOURCES = ("pend", "timer", "recv", "graph", "hint", "turn", "eta")


class Recorder:
    """Wraps the memory manager's acquire/evict/install to log them (one run at a time)."""

    def __init__(self) -> None:
        self.calls = 0
        self.accesses: list[tuple[int, str]] = []  # (call number, object key)
        self.evictions: list[tuple[int, str, list[str], dict[str, Any], float]] = []
        self.installs: list[tuple[int, str, str]] = []
        self._originals = (MemoryManager.acquire, MemoryManager._evict, MemoryManager._installed)

    def __enter__(self) -> "Recorder":
        acquire, evict, installed = self._originals
        rec = self

        def _acquire(manager, owner, objects):
            state = acquire(manager, owner, objects)
            if state is not None:
                rec.calls += 1
                rec.accesses += [(rec.calls, o.key) for o in objects]
            return state

        def _evict(manager: MemoryManager, obj, cause, protect=frozenset()):
            candidates = [k for k, o in manager.resident.items() if o.pins == 0 and k != obj.key]
            views = {k: (manager.distance_of(manager.resident[k]), oracle_view(manager, k))
                     for k in candidates}
            views[obj.key] = (manager.distance_of(obj), oracle_view(manager, obj.key))
            now = getattr(getattr(manager.distance, "env", None), "now", math.nan)
            rec.evictions.append((rec.calls + 1, obj.key, candidates, views, now))
            return evict(manager, obj, cause, protect)

        def _installed(manager, obj, op, tier_from, cause, distance, seconds):
            rec.installs.append((rec.calls + 1, obj.key, op))
            return installed(manager, obj, op, tier_from, cause, distance, seconds)

        MemoryManager.acquire, MemoryManager._evict, MemoryManager._installed = (  # type: ignore[method-assign]
            _acquire, _evict, _installed)
        return self

    def __exit__(self, *exc: Any) -> None:
        MemoryManager.acquire, MemoryManager._evict, MemoryManager._installed = (  # type: ignore[method-assign]
            self._originals)


def oracle_view(manager: MemoryManager, key: str) -> dict[str, float]:
    """What the distance oracle knows about the agent owning ``key`` (empty without one)."""
    source, agent = manager.distance, key.split(":", 1)[1]
    source = getattr(source, "source", source)  # through NoisyDistance
    tables = {"pend": "_pending", "timer": "_timer", "recv": "_receive", "graph": "_via_graph",
              "hint": "_hint", "turn": "_turn", "eta": "_eta"}
    if not hasattr(source, "_timer"):
        return {}
    return {name: round(getattr(source, table)[agent], 1) for name, table in tables.items()
            if agent in getattr(source, table)}


def analyse(rec: Recorder, examples: int) -> dict[str, Any]:
    uses: dict[str, list[int]] = collections.defaultdict(list)
    for call, key in rec.accesses:
        uses[key].append(call)

    def next_use(key: str, call: int) -> float:
        calls = uses[key]
        i = bisect.bisect_left(calls, call)
        return calls[i] if i < len(calls) else math.inf

    regret, shown, why = 0, [], collections.Counter()
    for call, key, candidates, views, now in rec.evictions:
        mine = next_use(key, call)
        if math.isinf(mine):
            continue
        later = [c for c in candidates if next_use(c, call) > mine]
        if not later:
            continue
        regret += 1
        view = views[key][1]
        # which source set the evicted agent's estimate (the first one equal to its eta)
        why[next((s for s in SOURCES[:-1] if s in view and view[s] == view.get("eta")),
                 "none") if view else "no oracle"] += 1
        if len(shown) < examples:
            kept = max(later, key=lambda c: next_use(c, call))
            shown.append(f"  call {call} (sim {now}): evicted {key} (used in {mine - call} calls; "
                         f"{views[key]}), kept {kept} (used in {next_use(kept, call) - call}; "
                         f"{views[kept]})")
    evicted_at: dict[str, list[int]] = collections.defaultdict(list)
    for call, key, *_ in rec.evictions:
        evicted_at[key].append(call)
    wasted = sum(1 for call, key, op in rec.installs if op == "prefetch"
                 and any(call <= e < next_use(key, call) for e in evicted_at[key]))
    return {"regret": regret, "wasted": wasted, "shown": shown, "why": why}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("world", choices=sorted(modeled_sim.WORLDS))
    parser.add_argument("agents", type=int)
    parser.add_argument("--budget", type=float, default=0.25,
                        help="agent-memory budget as a fraction of the working set")
    parser.add_argument("--until", type=float, default=1440.0,
                        help="simulated minutes (-1: the world's busy stretch)")
    parser.add_argument("--policies", default="lru,scalesim,belady",
                        help="comma-separated; belady replays the first policy's call order")
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    policies = args.policies.split(",")
    order = None
    if policies[0] == "belady":  # belady replays a recorded call order: record one first
        order = modeled_sim.run_world(args.world, args.agents, "lru", budget_fraction=args.budget,
                                      until=args.until)["order"]
    for policy in policies:
        with Recorder() as rec:
            start = time.perf_counter()
            r = modeled_sim.run_world(args.world, args.agents, policy,
                                      budget_fraction=args.budget, order=order, until=args.until)
            wall = time.perf_counter() - start
        order = order or r["order"]
        a = analyse(rec, args.examples if args.verbose else 0)
        pf = sum(1 for *_, op in rec.installs if op == "prefetch")
        print(f"{policy:9s} calls={r['calls']} misses={r['misses']} evictions={r['evictions']} "
              f"regret={a['regret']} prefetch={pf} wasted_prefetch={a['wasted']} "
              f"makespan={r['modeled_makespan_s']:.2f}s stall={r['modeled_stall_s']:.3f}s "
              f"loaded={r['bytes_loaded'] / 1e9:.2f}GB wall={wall:.1f}s", flush=True)
        if args.verbose:
            if any(k != "no oracle" for k in a["why"]):
                print("  regretted evictions by what set the evicted agent's estimate:",
                      dict(a["why"].most_common()))
            print("\n".join(a["shown"]))


if __name__ == "__main__":
    main()
