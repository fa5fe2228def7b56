"""The server's stream estimator, validated offline on recorded in-process request streams.

Issue #28, part 4. A client that sends no hints shows the server only when each agent's
requests arrive and finish; :class:`scalesim.serve.stream_estimator.StreamEstimator` predicts
the next calls from that. Here example worlds run in-process on the modeled engine (Qwen2.5-7B
profile on an H100, rank-16 adapters and 1,024-token prefix KV per agent, the budget a quarter of
the working set), and each world is measured two ways:

* **prediction** (Kendall tau-b): the first run (the ``scalesim`` policy on the in-process
  oracle) records the request stream: every arrival and finish with its agent and the engine's
  modeled time, the simulation clock kept aside for scoring only. Every ``--snapshot`` arrivals
  it also notes the oracle's order keys of the agents that have called and have nothing
  pending. The stream is written to ``results/streams/<world>.jsonl`` and replayed into a fresh
  estimator whose clock is the recorded modeled time (what a server's wall clock would show of
  a client with no think time). At each snapshot the realised order is the simulation time of
  each agent's next arrival (agents that do not call again tie for last); tau-b compares it
  with the oracle's keys, the estimator's and recency's (the agent that called last calls
  first: what ``lru`` bets on), over the same agents.
* **modeled makespan** of the same world and seed under ``lru``, ``scalesim`` on the oracle,
  ``scalesim`` reading nothing but pending calls (what the server did without hints before
  the estimator: recency), ``scalesim`` on the estimator (fed the live arrivals and finishes,
  on the engine's modeled clock, never the simulation's), and ``belady`` (the recorded order).
  Modeled makespans are deterministic: a difference is a difference, not noise.

    python -m experiments.bench_stream_estimator [--quick] [--worlds town,market]

The last line is a JSON headline (kept as ``results/bench_stream_estimator.json``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

from experiments.harness import headline
from experiments.modeled_sim import Setting, run_modeled
from experiments.results_dir import results_dir
from runtime.memory.distance import CallTrackingSource
from scalesim.prediction_quality import kendall_tau_b
from scalesim.serve.stream_estimator import StreamEstimator

#: world name -> (class, quick params, full params, agents param(s), simulated end in minutes)
WORLDS: dict[str, tuple[str, dict[str, Any], dict[str, Any], float | None]] = {
    "town": ("worlds.town:Town", {"villagers": 16, "max_tokens": 24, "reflect_every": 4},
             {"villagers": 60, "max_tokens": 24, "reflect_every": 4}, 1320.0),
    "social_feed": ("worlds.social_feed:SocialFeed",
                    {"users": 40, "attach": 3, "active_rate": 0.2, "step_minutes": 60,
                     "seed_posts": 2, "max_tokens": 24},
                    {"users": 200, "attach": 3, "active_rate": 0.2, "step_minutes": 60,
                     "seed_posts": 4, "max_tokens": 24}, 1440.0),
    "round_table": ("worlds.round_table:RoundTable",
                    {"tables": 3, "players": 5, "rounds": 3, "speech_minutes": 1,
                     "max_tokens": 20},
                    {"tables": 12, "players": 6, "rounds": 8, "speech_minutes": 1,
                     "max_tokens": 20}, None),
    "market": ("worlds.market:Market",
               {"traders": 24, "groups": 3, "period": 30, "window": 5, "impact": 0.1,
                "news_every": 60, "news_reach": 3, "max_tokens": 8},
               {"traders": 120, "groups": 6, "period": 30, "window": 5, "impact": 0.1,
                "news_every": 30, "news_reach": 6, "max_tokens": 8}, 1441.0),
}
#: the parameter(s) whose product is the number of LLM agents (sizes the budget)
AGENTS = {"town": ("villagers",), "social_feed": ("users",), "round_table": ("tables", "players"),
          "market": ("traders",)}
POLICIES = ("lru", "scalesim (oracle)", "scalesim (recency only)", "scalesim (estimator)",
            "belady")
SETTING = Setting()


class StreamRecorder:
    """Records a run's request stream and, every ``every`` arrivals, the oracle's order keys."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.events: list[dict[str, Any]] = []
        self.snapshots: dict[int, dict[str, float]] = {}  # arrival index -> agent -> oracle key
        self._pending: dict[str, int] = {}
        self._seen: dict[str, None] = {}
        self.arrivals = 0

    def attach(self, sim: Any) -> None:
        engine, env, oracle = sim.engine, sim.env, sim.oracle

        def submitted(agent: str) -> None:
            self.events.append({"e": "submit", "agent": agent, "t": engine.clock.now(),
                                "sim": float(env.now)})
            self._pending[agent] = self._pending.get(agent, 0) + 1
            self._seen[agent] = None
            self.arrivals += 1
            if self.arrivals % self.every == 0:
                self.snapshots[len(self.events)] = {
                    a: oracle.order_key(a) for a in self._seen if a not in self._pending}

        def finished(call: Any, done: Any) -> None:
            agent = call.agent_id
            self.events.append({"e": "finish", "agent": agent, "t": engine.clock.now(),
                                "sim": float(env.now)})
            left = self._pending.get(agent, 0) - 1
            if left > 0:
                self._pending[agent] = left
            else:
                self._pending.pop(agent, None)

        env.submit_listeners.append(submitted)
        env.completion_listeners.append(finished)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for event in self.events:
                f.write(json.dumps(event) + "\n")
        return path


class WallishClock:
    """What a server's clock would show of an in-process run: the engine's modeled time plus
    ``think_s`` for every advance of the simulation clock (the simulator's own work between
    steps, during which nothing is pending). The advances are counted, their sizes never
    read: the estimator learns that the simulation moved on, not by how much."""

    def __init__(self, think_s: float) -> None:
        self.think_s = think_s
        self.engine: Any = None
        self.advances = 0
        self._sim: float | None = None

    def saw(self, sim_now: float) -> None:
        """An arrival or finish at simulation time ``sim_now``."""
        if self._sim is not None and sim_now > self._sim:
            self.advances += 1
        self._sim = sim_now

    def __call__(self) -> float:
        modeled = self.engine.clock.now() if self.engine is not None else 0.0
        return modeled + self.think_s * self.advances


def live_estimator(think_s: float) -> tuple[Callable[[Any], Any], Callable[[Any], None]]:
    """A distance factory and an attach hook that make the memory manager read a
    :class:`StreamEstimator` fed the live stream on a :class:`WallishClock`."""
    clock = WallishClock(think_s)
    return fed(StreamEstimator(clock), clock)


def fed(estimator: Any, clock: WallishClock | None = None
        ) -> tuple[Callable[[Any], Any], Callable[[Any], None]]:
    """A distance factory and an attach hook that make the memory manager read ``estimator``
    (a :class:`CallTrackingSource`), fed the live arrivals and finishes (and ``clock`` the
    run's engine and simulation instants)."""

    def attach(sim: Any) -> None:
        if clock is not None:
            clock.engine = sim.engine

        expire = getattr(estimator, "expire", lambda: 0)  # the server's loop: every iteration

        def submitted(agent: str) -> None:
            if clock is not None:
                clock.saw(float(sim.env.now))
            expire()
            estimator.on_submit(agent)

        def finished(call: Any, done: Any) -> None:
            if clock is not None:
                clock.saw(float(sim.env.now))
            estimator.on_finish(call.agent_id)
            expire()

        sim.env.submit_listeners.append(submitted)
        sim.env.completion_listeners.append(finished)

    return (lambda oracle: estimator), attach


def replay_taus(events: list[dict[str, Any]], snapshots: dict[int, dict[str, float]],
                think_s: float) -> dict[str, Any]:
    """Replay ``events`` into a fresh estimator on a :class:`WallishClock` (the simulation
    clock hidden from it) and score it, the oracle's recorded keys and recency at every
    snapshot (mean Kendall tau-b)."""
    # The realised outcome at event index i: the sim time of each agent's next arrival.
    next_call: list[dict[str, float]] = [{} for _ in range(len(events) + 1)]
    upcoming: dict[str, float] = {}
    wanted = set(snapshots)
    for i in range(len(events) - 1, -1, -1):
        if i + 1 in wanted:
            next_call[i + 1] = dict(upcoming)
        if events[i]["e"] == "submit":
            upcoming[events[i]["agent"]] = events[i]["sim"]
    clock = WallishClock(think_s)
    modeled = type("Recorded", (), {"now": 0.0})()
    clock.engine = type("Engine", (), {"clock": type("Clock", (), {"now": lambda _: modeled.now})()})()
    estimator = StreamEstimator(clock)
    last_call: dict[str, int] = {}
    taus: dict[str, list[float]] = {"oracle": [], "estimator": [], "recency": []}
    for i, event in enumerate(events):
        modeled.now = event["t"]
        clock.saw(event["sim"])
        estimator.expire()
        if event["e"] == "submit":
            estimator.on_submit(event["agent"])
            last_call[event["agent"]] = i
        else:
            estimator.on_finish(event["agent"])
        oracle_keys = snapshots.get(i + 1)
        if oracle_keys is None or len(oracle_keys) < 4:
            continue
        outcome = next_call[i + 1]
        agents = sorted(oracle_keys)
        realised = [outcome.get(a, math.inf) for a in agents]
        # Ties (agents a source knows nothing of) are broken by recency, as the memory
        # manager breaks them.
        for name, keys in (("oracle", [(oracle_keys[a], -last_call[a]) for a in agents]),
                           ("estimator", [(estimator.order_key(a), -last_call[a])
                                          for a in agents]),
                           ("recency", [(0.0, -last_call[a]) for a in agents])):
            tau = kendall_tau_b(list(zip(keys, realised)))
            if tau is not None:
                taus[name].append(tau)
    return {name: round(sum(v) / len(v), 4) if v else None for name, v in taus.items()} | {
        "snapshots": len(taus["oracle"]), "rounds_detected": estimator.rounds,
        "lockstep": estimator.lockstep,
        "signal_scores": {k: round(v, 3) for k, v in estimator.trust.items()}}


def run_world(name: str, quick: bool, snapshot: int, out: Path, think_s: float
              ) -> dict[str, Any]:
    """Every policy on one world, then the replayed stream's taus."""
    cls, quick_params, full_params, until = WORLDS[name]
    params = quick_params if quick else full_params
    agents = math.prod(int(params[p]) for p in AGENTS[name])
    budget = max(1, int(SETTING.bytes_per_agent() * agents * 0.25))
    common: dict[str, Any] = {"setting": SETTING, "memory_bytes": budget, "until": until}
    recorder = StreamRecorder(snapshot)
    rows: dict[str, Any] = {}
    oracle = run_modeled(cls, params, "scalesim", attach=recorder.attach, **common)
    rows["scalesim (oracle)"] = oracle
    rows["lru"] = run_modeled(cls, params, "lru", **common)
    distance, attach = fed(CallTrackingSource())
    rows["scalesim (recency only)"] = run_modeled(cls, params, "scalesim", distance=distance,
                                                  attach=attach, **common)
    distance, attach = live_estimator(think_s)
    rows["scalesim (estimator)"] = run_modeled(cls, params, "scalesim", distance=distance,
                                               attach=attach, **common)
    rows["belady"] = run_modeled(cls, params, "belady", order=oracle["order"], **common)
    recorder.write(out / "streams" / f"{name}.jsonl")
    makespan = {p: round(float(rows[p]["modeled_makespan_s"]), 4) for p in POLICIES}
    taus = replay_taus(recorder.events, recorder.snapshots, think_s)
    # The same replay on the engine's clock alone (a client with no think time at all).
    no_think = replay_taus(recorder.events, recorder.snapshots, 0.0)
    taus["estimator_no_think_time"] = no_think["estimator"]
    calls = {p: rows[p]["calls"] for p in POLICIES}
    # The placeholder replies go round in completion order, which batching (and so the memory
    # policy) can change: a world whose branches read them may make other calls. Said, not hidden.
    result = {"agents": agents, "calls": calls["lru"], "same_calls": len(set(calls.values())) == 1,
              "calls_by_policy": calls, "budget_bytes": budget,
              "modeled_makespan_s": makespan,
              "estimator_over_lru": round(makespan["lru"] / makespan["scalesim (estimator)"], 4),
              "oracle_over_lru": round(makespan["lru"] / makespan["scalesim (oracle)"], 4),
              "kendall_tau": taus}
    print(f"{name:12s} agents {agents:4d} calls {result['calls']:6d} | makespan (modeled s) "
          + " ".join(f"{p} {makespan[p]:.3f}" for p in POLICIES)
          + f" | tau oracle {taus['oracle']} estimator {taus['estimator']} recency "
            f"{taus['recency']} ({taus['snapshots']} snapshots)", flush=True)
    return result


SERVER_VARIANTS: dict[str, tuple[str, bool]] = {
    "tokens + lru": ("lru", False),
    "tokens + scalesim, no estimator": ("scalesim", False),
    "tokens + scalesim, estimator": ("scalesim", True),
}


def server_streams(quick: bool, out: Path) -> dict[str, Any]:
    """The request streams of :mod:`experiments.bench_prefix_stream` (OASIS-, AgentScope-,
    Concordia- and salon-shaped clients, no hints) replayed through the in-process server on
    the modeled engine, ``serve.stream_estimator`` off and on. The estimator runs on the
    server's wall clock here, so these makespans can move a little from run to run."""
    import asyncio

    from experiments import bench_prefix_stream as bps
    from scalesim.config import load_serve_config
    from scalesim.serve import build_server

    results: dict[str, Any] = {}
    for stream in bps.build_streams(0, quick, False):
        path = stream.write(out / "streams" / f"{stream.name}.jsonl")
        budget = max(1, int(bps.run_variant(path, False, "unbounded", None).kv_bytes * 0.25))
        rows: dict[str, Any] = {}
        for variant, (policy, estimator) in SERVER_VARIANTS.items():
            config = bps.server_config(False, "tokens + lru", budget)
            config["runtime"]["memory"]["policy"] = policy
            config["serve"]["stream_estimator"] = estimator
            with build_server(load_serve_config(config)).running() as server:
                url = f"http://127.0.0.1:{server.port}/v1"
                result = asyncio.run(bps.replay(url, bps.MODEL["modeled"], bps.read_stream(path)))
                report = server.engine.report()
                summary = server.distance_summary()
            rows[variant] = {"modeled_s": round(float(report["modeled"]["modeled_makespan_s"]), 4),
                             "cached_tokens": result.cached_tokens,
                             "prompt_tokens": result.prompt_tokens,
                             "estimated_agents": summary.get("estimated_agents"),
                             "rounds": summary.get("stream_rounds"),
                             "lockstep": summary.get("stream_lockstep")}
        lru = rows["tokens + lru"]["modeled_s"]
        est = rows["tokens + scalesim, estimator"]["modeled_s"]
        results[stream.name] = {"budget_bytes": budget, "rows": rows,
                                "estimator_over_lru": round(lru / est, 4)}
        print(f"{stream.name:12s} (server) " + " | ".join(
            f"{v}: {r['modeled_s']:.3f} s, cached {r['cached_tokens']}"
            for v, r in rows.items()) + f" | rounds {rows['tokens + scalesim, estimator']['rounds']}",
            flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small worlds (smoke test)")
    parser.add_argument("--worlds", default=",".join(WORLDS))
    parser.add_argument("--no-server", action="store_true",
                        help="skip the client-shaped streams replayed through the server")
    parser.add_argument("--think-ms", type=float, default=50.0,
                        help="the simulator's own work per advance of its clock, as a server "
                             "would see it (WallishClock)")
    parser.add_argument("--snapshot", type=int, default=0,
                        help="arrivals between snapshots (0: a quarter of the agents, at least 4)")
    args = parser.parse_args()
    out = results_dir(args.quick)
    line: dict[str, Any] = {"experiment": "bench_stream_estimator", "modeled": True,
                            "engine": "modeled", "model": SETTING.model,
                            "hardware": SETTING.hardware, "budget_fraction": 0.25,
                            "think_ms": args.think_ms, "worlds": {}}
    for name in args.worlds.split(","):
        _, quick_params, full_params, _ = WORLDS[name]
        params = quick_params if args.quick else full_params
        agents = math.prod(int(params[p]) for p in AGENTS[name])
        line["worlds"][name] = run_world(name, args.quick, args.snapshot or max(4, agents // 4),
                                         out, args.think_ms / 1000)
    ratios = [w["estimator_over_lru"] for w in line["worlds"].values()]
    line["estimator_never_slower_than_lru"] = all(r >= 1.0 for r in ratios)
    line["worst_estimator_over_lru"] = min(ratios)
    if not args.no_server:
        line["server_streams"] = server_streams(args.quick, out)
        line["server_worst_estimator_over_lru"] = min(
            s["estimator_over_lru"] for s in line["server_streams"].values())
    headline(line, keep_as="bench_stream_estimator", quick=args.quick)


if __name__ == "__main__":
    main()
