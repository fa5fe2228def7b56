"""Diagnose memory policies on the modeled engine: misses, evictions and regret against MIN.

For each policy it runs one world (:func:`experiments.modeled_sim.run_world`) and records every
object access and, from the memory manager's events, every eviction and prefetch. An eviction is
*regretted* when some other candidate it could have evicted instead is used later than the
evicted object (what Belady's MIN would have chosen). A *wasted prefetch* is evicted again before
its next use.

With ``--verbose``, regretted evictions are counted by the source that set the estimate of the
evicted object's nearest user (``DistanceOracle.source_of``: ``pending``, ``timer``,
``deadline``, ``graph``, ``active``, ``turn``, ``hint``, ``fallback``), and the first ones are
printed with the distance of both objects and the oracle's account of their nearest user: its
estimated call time, the source in use, the estimates it was the earliest of
(``DistanceOracle.explain``) and those of distrusted sources. Under ``belady`` the distance is the number of calls until the
object's next use and there is no oracle to ask. Every number is modeled, except ``wall``.

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
from runtime.memory.events import MemoryEvent
from runtime.memory.manager import MemoryManager
from runtime.memory.objects import AgentMemory
from scalesim.distance import DistanceOracle

#: An eviction: (call number, evicted key, the other candidates, views, estimate's source).
Eviction = tuple[int, str, list[str], dict[str, str], str]


class Recorder:
    """Records the accesses, evictions and prefetches of the memory managers built in the block.

    Accesses come from :meth:`MemoryManager.acquire` (a hit is no memory event), evictions and
    prefetches from each manager's listeners. The views of the candidates of an eviction are only
    written when ``verbose``: describing every candidate at every eviction is the costly part.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.calls = 0
        self.accesses: list[tuple[int, str]] = []  # (call number, object key)
        self.evictions: list[Eviction] = []
        self.prefetches: list[tuple[int, str]] = []  # (call number, object key)
        self._originals = (MemoryManager.__init__, MemoryManager.acquire)

    def __enter__(self) -> "Recorder":
        init, acquire = self._originals
        rec = self

        def _init(manager, *args, **kwargs):
            init(manager, *args, **kwargs)
            manager.listeners.append(lambda event: rec.on_event(manager, event))

        def _acquire(manager, owner, objects):
            state = acquire(manager, owner, objects)
            if state is not None:
                rec.calls += 1
                rec.accesses += [(rec.calls, o.key) for o in objects]
            return state

        self._patch(_init, _acquire)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch(*self._originals)

    @staticmethod
    def _patch(init: Any, acquire: Any) -> None:
        setattr(MemoryManager, "__init__", init)
        setattr(MemoryManager, "acquire", acquire)

    def on_event(self, manager: MemoryManager, event: MemoryEvent) -> None:
        call = self.calls + 1  # what happens between calls counts toward the next one
        if event.op == "prefetch" and event.tier_to == "device":
            self.prefetches.append((call, event.object))
        elif event.op in ("evict", "drop") and event.tier_from == "device":
            obj = manager.objects[event.object]  # already off the device
            candidates = [k for k, o in manager.resident.items() if o.pins == 0]
            views = {}
            if self.verbose:
                views = {k: describe(manager, manager.resident[k]) for k in candidates}
                views[obj.key] = describe(manager, obj)
            self.evictions.append((call, obj.key, candidates, views, estimated_by(manager, obj)))


def oracle_of(manager: MemoryManager) -> DistanceOracle | None:
    """The distance oracle behind the manager's source (``None``: another, e.g. belady's)."""
    source = manager.distance
    source = getattr(source, "source", source)  # through NoisyDistance
    return source if isinstance(source, DistanceOracle) else None


def nearest_user(oracle: DistanceOracle, obj: AgentMemory) -> str | None:
    """The user whose estimate gives ``obj`` its distance."""
    return min(obj.users, key=oracle.order_key, default=None)


def estimated_by(manager: MemoryManager, obj: AgentMemory) -> str:
    """The source of the estimate of ``obj``'s nearest user."""
    oracle = oracle_of(manager)
    if oracle is None:
        return "no oracle"
    user = nearest_user(oracle, obj)
    return (oracle.source_of(user) if user is not None else None) or "nothing"


def describe(manager: MemoryManager, obj: AgentMemory) -> str:
    """``obj``'s distance and, under the oracle, how its nearest user's estimate was made."""
    text = f"distance {manager.distance_of(obj):.4g}"
    oracle = oracle_of(manager)
    user = nearest_user(oracle, obj) if oracle is not None else None
    if oracle is None or user is None:
        return text
    used = oracle.explain(user)
    unused = {s: t for s, t in oracle.estimates(user).items() if s not in used}
    sources = ", ".join(f"{s} {t:.1f}" for s, t in used.items()) or "no source"
    if unused:
        sources += "; distrusted: " + ", ".join(f"{s} {t:.1f}" for s, t in unused.items())
    return (f"{text}; {user} at sim {oracle.env.now:g}: eta {oracle.eta(user):.1f} by "
            f"{oracle.source_of(user) or 'nothing'} ({sources})")


def analyse(rec: Recorder, examples: int) -> dict[str, Any]:
    uses: dict[str, list[int]] = collections.defaultdict(list)
    for call, key in rec.accesses:
        uses[key].append(call)

    def next_use(key: str, call: int) -> float:
        calls = uses[key]
        i = bisect.bisect_left(calls, call)
        return calls[i] if i < len(calls) else math.inf

    regret, why = 0, collections.Counter[str]()
    shown: list[str] = []
    for call, key, candidates, views, source in rec.evictions:
        mine = next_use(key, call)
        if math.isinf(mine):
            continue
        later = [c for c in candidates if next_use(c, call) > mine]
        if not later:
            continue
        regret += 1
        why[source] += 1
        if len(shown) < examples:
            kept = max(later, key=lambda c: next_use(c, call))
            shown.append(f"  call {call}: evicted {key}, used again in {mine - call:g} calls "
                         f"({views[key]})\n    and kept {kept}, used again in "
                         f"{next_use(kept, call) - call:g} ({views[kept]})")
    evicted_at: dict[str, list[int]] = collections.defaultdict(list)
    for call, key, *_ in rec.evictions:
        evicted_at[key].append(call)
    wasted = sum(1 for call, key in rec.prefetches
                 if any(call <= e < next_use(key, call) for e in evicted_at[key]))
    return {"regret": regret, "wasted": wasted, "shown": shown, "why": why}


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    order = None
    if policies[0] == "belady":  # belady replays a recorded call order: record one first
        order = modeled_sim.run_world(args.world, args.agents, "lru", budget_fraction=args.budget,
                                      until=args.until)["order"]
    for policy in policies:
        with Recorder(args.verbose) as rec:
            start = time.perf_counter()
            r = modeled_sim.run_world(args.world, args.agents, policy,
                                      budget_fraction=args.budget, order=order, until=args.until)
            wall = time.perf_counter() - start
        order = order or r["order"]
        a = analyse(rec, args.examples if args.verbose else 0)
        print(f"{policy:9s} calls={r['calls']} misses={r['misses']} evictions={r['evictions']} "
              f"regret={a['regret']} prefetch={len(rec.prefetches)} "
              f"wasted_prefetch={a['wasted']} makespan={r['modeled_makespan_s']:.2f}s "
              f"stall={r['modeled_stall_s']:.3f}s loaded={r['bytes_loaded'] / 1e9:.2f}GB "
              f"wall={wall:.1f}s", flush=True)
        if args.verbose and a["regret"]:
            print("  regretted evictions by the source of the evicted object's estimate:",
                  dict(a["why"].most_common()))
            print("\n".join(a["shown"]))


if __name__ == "__main__":
    main()
