"""Run one world on the modeled engine under one memory policy and return its modeled totals.

This is the one harness every modeled experiment uses. :func:`run_world` configures a run of a
world on the :class:`~runtime.executors.modeled.ModeledExecutor` and hands it to
:class:`scalesim.Simulation` (the assembler ``python -m scalesim.run`` uses too), with the
distance source the policy needs:

* ``scalesim`` (and its ablations): :class:`scalesim.distance.DistanceOracle` on the live event
  queue, optionally through :class:`NoisyDistance`;
* ``belady``: :class:`runtime.memory.FutureSequence` over the call order recorded by a first run
  of the same world and seed (returned by every run as ``order``), i.e. the offline optimum;
* the others (``lru``, ``lfu``, ``fifo``, ``infinite``, ``none``): no distances.

It also sizes the agent-memory budget: :func:`working_set` is the bytes of every agent's
adapter and prefix KV, and experiments give the budget as a fraction of it. Every number in the
returned dict is modeled except ``wall_s`` and ``setup_s``, the real seconds the run and the
world's setup took here, and ``cpu_s``, the CPU seconds of the run.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from experiments.results_dir import results_dir
from runtime.cost_model import CostModel, hardware
from runtime.memory import Policy, make_policy
from runtime.model.profiles import profile
from scalesim import Simulation
from scalesim.config import RunConfig

#: Placeholder answers that keep the example worlds' branches busy (see LengthChat).
REPLIES = ("post", "reply", "nothing", "repost", "yes", "no", "ok")

WORLDS = {"town": "worlds.town:Town", "social_feed": "worlds.social_feed:SocialFeed"}

#: Simulated minutes that cover a busy stretch of each world (town days start at dawn).
BUSY_UNTIL = {"town": 720.0, "social_feed": 1440.0}


def world_params(world: str, agents: int, active: float | None = None) -> dict[str, Any]:
    """The world's parameters for ``agents`` agents (``active``: share active per step)."""
    if world == "town":
        return {"villagers": agents, "max_tokens": 24}
    if world == "social_feed":
        return {"users": agents, "attach": 3, "active_rate": active if active else 0.2,
                "seed_posts": max(2, agents // 500), "max_tokens": 24}
    raise KeyError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")


@dataclass(frozen=True)
class Setting:
    """The modeled hardware and per-agent memory of an experiment."""

    hardware: str = "H100"
    model: str = "qwen2.5-7b"
    lora_rank: int = 16
    prefix_tokens: int = 1024
    output_tokens: int = 24
    managed: tuple[str, ...] = ("adapter", "prefix_kv")
    #: keep evicted prefix KV in host memory (a miss is a copy) instead of dropping it (a prefill)
    prefix_on_host: bool = False

    def bytes_per_agent(self) -> int:
        cost = CostModel(hardware(self.hardware), profile(self.model))
        n = 0
        if "adapter" in self.managed and self.lora_rank:
            n += cost.lora_bytes(self.lora_rank)
        if "prefix_kv" in self.managed:
            n += self.prefix_tokens * cost.kv_bytes_per_token
        return n

    def label(self) -> str:
        where = "kept on host when evicted" if self.prefix_on_host else "dropped when evicted"
        return (f"modeled: {self.model} on {self.hardware}, rank-{self.lora_rank} adapters, "
                f"{self.prefix_tokens}-token prefixes {where}")


def working_set(setting: Setting, agents: int) -> int:
    return setting.bytes_per_agent() * agents


class NoisyDistance:
    """A distance source whose predictions are wrong by ``noise`` (relative, Gaussian).

    Whenever the true estimated call time of an agent changes, the noisy one is drawn as
    ``now + (eta - now) * max(0, 1 + noise * N(0, 1))``: the horizon seen at that moment is off
    by the factor, and the agent keeps that wrong estimate until the truth changes again (one
    prediction is wrong consistently rather than flickering between queries). Pending calls stay
    at distance 0. Like the oracle it offers ``order_key`` and ``watch``, so the memory manager's
    eviction index stays incremental.
    """

    def __init__(self, source: Any, noise: float, seed: int = 0) -> None:
        self.source, self.noise = source, noise
        self.rng = random.Random(seed)
        self._key: dict[str, float] = {}
        self._watchers: list[Any] = []
        source.watch(self._changed)

    def _changed(self, agent: str) -> None:
        self._key.pop(agent, None)
        for callback in self._watchers:
            callback(agent)

    def watch(self, callback: Any) -> None:
        self._watchers.append(callback)

    def order_key(self, agent: str) -> float:
        key = self._key.get(agent)
        if key is None:
            eta, now = self.source.order_key(agent), self.source.env.now
            key = eta
            if self.noise and not math.isinf(eta) and eta > now:
                key = now + (eta - now) * max(0.0, 1.0 + self.noise * self.rng.gauss(0.0, 1.0))
            self._key[agent] = key
        return key

    def distance(self, agent_id: str) -> float:
        if self.source.distance(agent_id) == 0.0:
            return 0.0
        return max(0.0, self.order_key(agent_id) - self.source.env.now)

    def nearest(self, k: int) -> list[str]:
        pool = self.source.nearest(4 * k if self.noise else k)
        return sorted(pool, key=self.order_key)[:k]


def make_named_policy(name: str) -> Policy:
    """A policy by name, including the ablations of ``scalesim``."""
    if name == "scalesim-no-prefetch":
        policy = make_policy("scalesim")
        policy.prefetch = False
        return policy
    if name == "lru-prefetch":  # no priority eviction: LRU order, distance prefetch
        policy = make_policy("lru")
        policy.prefetch = True
        return policy
    if name in ("scalesim-no-preempt", "scalesim-adapters", "scalesim-prefix"):
        return make_policy("scalesim")
    return make_policy(name)


def run_world(world: str, agents: int, policy: str, *, setting: Setting = Setting(),
              budget_fraction: float | None = 0.25, memory_bytes: int | None = None,
              until: float | None = -1.0, seed: int = 0, active: float | None = None,
              noise: float = 0.0, order: list[str] | None = None,
              max_calls: int | None = None, lookahead: int = 32,
              replicas: int = 1, split: AbstractContextManager[Any] | None = None
              ) -> dict[str, Any]:
    """Run ``world`` with ``agents`` agents under ``policy``; return modeled totals.

    The agent-memory budget is ``memory_bytes`` or ``budget_fraction`` of the working set.
    ``until`` is in simulated minutes (``-1``: the world's :data:`BUSY_UNTIL`; ``None``: no end).
    ``order`` is the recorded call order ``belady`` needs. ``max_calls`` stops the run early.
    ``split`` (e.g. an :class:`experiments.time_split.TimeSplit`) is open while the run goes,
    not while the world is built. The run is assembled by :class:`scalesim.Simulation`, as ``python -m scalesim.run`` does.
    """
    if until == -1.0:
        until = BUSY_UNTIL[world]
    if policy == "scalesim-adapters":
        setting = replace(setting, managed=("adapter",))
    elif policy == "scalesim-prefix":
        setting = replace(setting, managed=("prefix_kv",))
    if memory_bytes is None and budget_fraction is not None:
        memory_bytes = max(1, int(working_set(setting, agents) * budget_fraction))
    out = run_modeled(WORLDS[world], world_params(world, agents, active), policy,
                      setting=setting, memory_bytes=memory_bytes, until=until, seed=seed,
                      noise=noise, order=order, max_calls=max_calls, lookahead=lookahead,
                      replicas=replicas, split=split)
    out.update({"world": world, "agents": agents,
                "working_set_bytes": working_set(setting, agents)})
    return out


def run_modeled(world_class: str, params: dict[str, Any], policy: str, *,
                setting: Setting = Setting(), memory_bytes: int | None = None,
                until: float | None = None, seed: int = 0, noise: float = 0.0,
                order: list[str] | None = None, max_calls: int | None = None,
                lookahead: int = 32, oracle: dict[str, Any] | None = None,
                replies: Sequence[str] | Mapping[str, Sequence[str]] = REPLIES,
                replicas: int = 1, call_duration: float = 0.0,
                split: AbstractContextManager[Any] | None = None,
                distance: Callable[[Any], Any] | None = None,
                attach: Callable[[Simulation], None] | None = None) -> dict[str, Any]:
    """Run the world ``world_class`` (``module:Class``) with ``params`` on the modeled engine.

    The harness under :func:`run_world` for any world: ``memory_bytes`` is the agent-memory
    budget (``None``: no limit), ``until`` the simulated end (``None``: until nothing is left).
    With ``oracle`` the run's oracle quality (``summary.json``'s ``distance`` section) is
    stored there. ``replies`` are the placeholder answers of the modeled chat. ``replicas`` > 1
    runs that many in-process modeled engines, each with the budget ``memory_bytes`` (the
    returned ``replicas`` entry is ``summary.json``'s section). ``call_duration`` is the world's
    ``sim.call_duration``; the returned ``occupancy`` entry is ``summary.json``'s section.
    ``split`` is entered around the run (not the world's setup). ``rss_setup_bytes`` is how much
    the process's resident memory grew while the world was built (its agents, graph and
    memory objects). ``distance`` replaces the source the memory manager reads (it gets the
    oracle, as ``Simulation``'s ``distance`` does); ``attach`` is called with the built
    simulation before it runs (to add listeners).
    """
    if policy == "belady" and order is None:
        raise ValueError("policy 'belady' needs the call order of an earlier run (order=...)")
    config = RunConfig.model_validate({
        "world": {"class": world_class, "params": params},
        "sim": {"seed": seed, "call_duration": call_duration},
        "runtime": {
            "executor": "modeled", "model": setting.model, "replicas": replicas,
            "max_num_seqs": 256, "max_batch_tokens": 8192, "block_size": 16,
            "modeled": {"hardware": setting.hardware, "lora_rank": setting.lora_rank,
                        "managed": list(setting.managed), "prefix_tokens": setting.prefix_tokens,
                        "output_tokens": setting.output_tokens, "replies": ({k: list(v) for k, v in replies.items()}
                                    if isinstance(replies, Mapping) else list(replies)),
                        "preempt_prefetch": policy != "scalesim-no-preempt"},
            "memory": {"device_bytes": memory_bytes, "lookahead": lookahead,
                       "host_bytes": None if setting.prefix_on_host else 0}}})
    rss_before = resident_bytes()
    sim = Simulation(config, policy=make_named_policy(policy), order=order, record=False,
                     distance=distance if distance is not None else
                     (lambda oracle: NoisyDistance(oracle, noise, seed)) if noise else None)
    if attach is not None:
        attach(sim)
    sim.build_world()
    rss_setup = resident_bytes() - rss_before
    with split if split is not None else nullcontext():
        sim.run(until=math.inf if until is None else until, max_calls=max_calls)
    report = sim.engine.report()
    out = dict(report["modeled"])
    if "replicas" in report:
        out["replicas"] = report["replicas"]
    out["occupancy"] = sim.env.occupancy.summary()
    sim.engine.close()
    if sim.failed:
        raise RuntimeError(f"{len(sim.failed)} modeled calls failed, e.g.: {sim.failed[0]}")
    if oracle is not None and sim.oracle is not None:
        oracle.update(sim.oracle.quality())
    out.update({"world": world_class, "policy": policy, "calls": len(sim.calls),
                "sim_time": sim.env.now, "wall_s": sim.run_seconds,
                "cpu_s": sim.run_cpu_seconds,
                "setup_s": sim.setup_seconds, "rss_setup_bytes": rss_setup,
                "memory_bytes": memory_bytes, "noise": noise,
                "setting": setting.label()})
    out["order"] = sim.calls
    return out


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def write_results(name: str, rows: list[dict[str, Any]], x: str, *, series: str = "policy",
                  panel: str | None = None, y: str = "modeled_makespan_s", title: str = "",
                  logx: bool = False, quick: bool = False) -> Any:
    """Write ``results/<name>.csv`` and a line plot of ``y`` against ``x`` per ``series``.

    One subplot per value of ``panel`` (e.g. the world). The y label says the numbers are
    modeled. A ``quick`` run writes to ``results/quick/`` (see :mod:`experiments.results_dir`).
    Returns the rows as a pandas DataFrame (``order`` columns dropped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    results = results_dir(quick)
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "order"} for r in rows])
    df.to_csv(results / f"{name}.csv", index=False)
    panels = list(dict.fromkeys(df[panel])) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        part = df if p is None else df[df[panel] == p]
        for s, group in part.groupby(series, sort=False):
            ax.plot(group[x], group[y], "o-", ms=3, label=str(s))
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(f"{y} (modeled)")
        ax.set_title(f"{p}" if p is not None else title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}\n{rows[0].get('setting', '')}" if rows else title, fontsize=9)
    fig.tight_layout()
    fig.savefig(results / f"{name}.png", dpi=110)
    plt.close(fig)
    return df


def headline(name: str, **values: Any) -> None:
    """Print the experiment's one JSON headline line (always marked as modeled)."""
    import json

    print(json.dumps({"experiment": name, "modeled": True, **values}))


def experiment_parser(doc: str, agents: int) -> argparse.ArgumentParser:
    """The options every agent-count experiment takes: ``--quick`` and ``--agents``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke test)")
    parser.add_argument("--agents", type=int, default=agents)
    return parser


def speedup(rows: Any, of: str = "scalesim", over: str = "lru") -> float:
    """``over``'s modeled makespan divided by ``of``'s among ``rows`` (dicts or a DataFrame) of
    one setting, rounded to three places."""
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    makespan = {r["policy"]: r["modeled_makespan_s"] for r in records}
    return round(makespan[over] / makespan[of], 3)


def run_policies(world: str, agents: int, policies: list[str], **kw: Any) -> list[dict[str, Any]]:
    """Run ``policies`` on one world; ``belady`` reuses the call order of the first run."""
    rows, order = [], None
    for policy in sorted(policies, key=lambda p: p == "belady"):
        r = run_world(world, agents, policy, order=order, **kw)
        order = order or r["order"]
        rows.append(r)
    return rows
