"""How fast is the modeled stack? The DES, the distance oracle and the modeled engine serving
1,000,000 LLM calls, timed in wall seconds on this machine.

social_feed with ``--users`` users runs under the scalesim policy (oracle and prefetch on) until
``--calls`` calls were submitted. The JSON line has ``calls``, ``seconds`` (wall, real, the run
itself), ``setup_seconds`` (building the world's agents and graph) and the rate; the makespan it
prints is modeled.

    python -m experiments.scale [--quick] [--calls N] [--users N] [--replicas N]
"""

from __future__ import annotations

import argparse

from experiments.modeled_sim import Setting, headline, run_world, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=150_000)
    parser.add_argument("--policy", default="scalesim")
    parser.add_argument("--replicas", type=int, default=1,
                        help="modeled engine replicas (GPUs), each with the same budget")
    args = parser.parse_args()
    calls = 20_000 if args.quick else args.calls
    users = 5000 if args.quick else args.users
    setting = Setting(output_tokens=8)
    r = run_world("social_feed", users, args.policy, setting=setting, budget_fraction=0.25,
                  until=None, max_calls=calls, replicas=args.replicas)
    rate = r["calls"] / r["wall_s"]
    print(f"{r['calls']} calls in {r['wall_s']:.1f} s wall ({rate:.0f} calls/s), after "
          f"{r['setup_s']:.1f} s building the world; modeled makespan "
          f"{r['modeled_makespan_s']:.1f} s; sim time {r['sim_time']:.0f} min")
    r["calls_per_s"] = rate
    write_results("scale", [r], "calls", title="scale run", quick=args.quick)
    headline("scale", calls=r["calls"], seconds=round(r["wall_s"], 1),
             setup_seconds=round(r["setup_s"], 1),
             calls_per_s=round(rate, 1), users=users, policy=args.policy,
             replicas=args.replicas,
             modeled_makespan_s=round(r["modeled_makespan_s"], 1))


if __name__ == "__main__":
    main()
