"""How fast is the modeled stack? The DES, the distance oracle and the modeled engine serving
1,000,000 LLM calls, timed in wall seconds on this machine, with where the time goes.

social_feed with ``--agents`` users runs under the scalesim policy (oracle and prefetch on) until
``--calls`` calls were submitted. The JSON line has ``calls``, ``seconds`` (wall, real, the run
itself), ``cpu_seconds`` (the process's CPU time over the run: on a machine shared with other
jobs a steadier measure than wall time, ``calls_per_cpu_s`` the rate by it), ``setup_seconds``
(building the world's agents and graph), the rate, ``peak_rss_gib``
(the process's peak resident memory), ``bytes_per_agent`` (what building the world added to the
resident memory, per agent) and ``split``: each component's share of the run's wall time (the
oracle, the memory manager, the prefix cache, the modeled engine, the DES, the world), sampled
every 5 ms (:mod:`experiments.time_split`). The makespan it prints is modeled.

    python -m experiments.scale [--quick] [--calls N] [--agents N] [--replicas N]
"""

from __future__ import annotations

import argparse
import gc
import resource

from experiments.modeled_sim import Setting, headline, run_world, write_results
from experiments.time_split import TimeSplit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--agents", "--users", dest="agents", type=int, default=150_000,
                        help="users of the social network (agents)")
    parser.add_argument("--policy", default="scalesim")
    parser.add_argument("--replicas", type=int, default=1,
                        help="modeled engine replicas (GPUs), each with the same budget")
    args = parser.parse_args()
    calls = 20_000 if args.quick else args.calls
    agents = 5000 if args.quick else args.agents
    setting = Setting(output_tokens=8)
    split = TimeSplit()
    r = run_world("social_feed", agents, args.policy, setting=setting, budget_fraction=0.25,
                  until=None, max_calls=calls, replicas=args.replicas, split=split)
    # The run's millions of objects live until the process exits: the default collector, back
    # after the run, would rescan them while the results are written (matplotlib's import alone
    # set off full collections: ~9 CPU s after a 30,000-call run of 150,000 users, more than a
    # third of the run's own). Frozen, they are never scanned again; nothing here is garbage.
    gc.freeze()
    rate = r["calls"] / r["wall_s"]
    cpu_rate = r["calls"] / r["cpu_s"] if r["cpu_s"] > 0 else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    per_agent = r["rss_setup_bytes"] / agents
    shares = split.shares()
    print(f"{r['calls']} calls in {r['wall_s']:.1f} s wall ({rate:.0f} calls/s; "
          f"{r['cpu_s']:.1f} CPU s, {cpu_rate:.0f} calls per CPU s), after "
          f"{r['setup_s']:.1f} s building the world of {agents} agents "
          f"({per_agent:,.0f} bytes each); peak RSS {peak / 2**30:.2f} GiB; modeled makespan "
          f"{r['modeled_makespan_s']:.1f} s; sim time {r['sim_time']:.0f} min")
    print("wall time by component: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    r["calls_per_s"] = rate
    write_results("scale", [r], "calls", title="scale run", quick=args.quick)
    headline("scale", calls=r["calls"], seconds=round(r["wall_s"], 1),
             cpu_seconds=round(r["cpu_s"], 1), calls_per_cpu_s=round(cpu_rate, 1),
             setup_seconds=round(r["setup_s"], 1),
             calls_per_s=round(rate, 1), agents=agents, policy=args.policy,
             replicas=args.replicas, peak_rss_gib=round(peak / 2**30, 2),
             bytes_per_agent=round(per_agent), split=shares,
             modeled_makespan_s=round(r["modeled_makespan_s"], 1))


if __name__ == "__main__":
    main()
