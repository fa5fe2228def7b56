"""Resuming a killed run: how much faster the replayed half goes than it went live.

One world (the town on the real model by default, small) runs three times:

1. uninterrupted, for the reference trace;
2. in a subprocess that flushes every call and is killed with SIGKILL once about half of the
   reference's calls are on disk;
3. resumed from the killed run's directory (``--resume``): its recorded calls are replayed, then
   the run goes live to the end.

Printed: the calls recorded before the kill, the wall seconds they took live (from the start of
the clock to the last recorded call's finish, in the killed run) and replayed (the same in the
resumed run, to its last replayed call), their ratio, and whether the resumed trace is identical
to the uninterrupted one (agent, sim time, prompt, completion of every call). Ends with one JSON
line::

    python -m experiments.bench_resume                 # town, 4 villagers, a few minutes here
    python -m experiments.bench_resume --config worlds/town_large.yaml \\
        --set runtime.executor=modeled --set world.params.villagers=300   # modeled, large

Wall times are measured on this machine (model loading is outside them: the clock of a run's
record starts once its engine is built).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.harness import headline

ROOT = Path(__file__).resolve().parent.parent
SAME = ["agent", "sim_time", "sim_time_done", "prompt", "completion"]


def run_cli(config: str, sets: list[str], out: Path, *extra: str) -> None:
    from scalesim.run import main

    if main([config, *sets, "--out", str(out), "--no-progress", *extra]) != 0:
        raise RuntimeError(f"the run into {out} failed")


def kill_at(config: str, sets: list[str], out: Path, calls: int) -> int:
    """Run in a subprocess flushing every call; SIGKILL it once ``calls`` calls are on disk.
    Returns how many calls the killed run recorded."""
    import scalesim

    proc = subprocess.Popen([sys.executable, "-m", "scalesim.run", config, *sets, "--out",
                             str(out), "--no-progress", "--set", "output.flush_calls=1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if len(list((out / "trace.parts").glob("part-*.parquet"))) >= calls:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError("the run ended before it was killed: choose a longer one")
    return len(scalesim.load_trace(out).trace)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import scalesim

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "worlds" / "town.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=None,
                        help="override (default: 4 villagers, one day, 12 output tokens)")
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="kill once this share of the reference's calls is recorded")
    args = parser.parse_args(argv)
    sets = [item for s in (args.sets if args.sets is not None else [
        "world.params.villagers=4", "sim.until=1320", "world.params.max_tokens=12"])
        for item in ("--set", s)]
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        run_cli(args.config, sets, work / "full")
        full = scalesim.load_trace(work / "full")
        recorded = kill_at(args.config, sets, work / "killed", int(len(full.trace) * args.kill_at))
        killed = scalesim.load_trace(work / "killed")
        run_cli(args.config, sets, work / "resumed", "--resume", str(work / "killed"))
        resumed = scalesim.load_trace(work / "resumed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    live_s = float(killed.trace.finish_wall.max())
    replayed = resumed.trace[resumed.trace.replayed]
    replay_s = float(replayed.finish_wall.max()) if len(replayed) else float("nan")
    # The live part: after the recorded calls in the uninterrupted run; after the replay in the
    # resumed one, which starts with nothing resident (replayed calls load no memory).
    live_rest_full = float(full.trace.finish_wall.max() - full.trace.finish_wall.iloc[recorded - 1])
    live_rest_resumed = float(resumed.trace.finish_wall.max() - replay_s)
    identical = resumed.trace[SAME].reset_index(drop=True).equals(
        full.trace[SAME].reset_index(drop=True))
    print(f"{len(full.trace)} calls uninterrupted; killed after {recorded} recorded calls, which "
          f"took {live_s:.2f} s live and {replay_s:.3f} s replayed ({live_s / replay_s:.0f}x); "
          f"resumed trace identical: {identical}; went live at "
          f"{resumed.summary['replay']['live_from']}", flush=True)
    return headline({"experiment": "bench_resume", "config": args.config, "sets": sets,
                     "calls": len(full.trace), "recorded_calls": recorded,
                     "replayed_calls": int(len(replayed)), "live_s": round(live_s, 3),
                     "replay_s": round(replay_s, 4),
                     "replay_speedup": round(live_s / replay_s, 1),
                     "resumed_identical": bool(identical),
                     "rest_live_s_uninterrupted": round(live_rest_full, 2),
                     "rest_live_s_resumed": round(live_rest_resumed, 2),
                     "resumed_wall_s": round(float(resumed.summary["wall_seconds"]), 2),
                     "uninterrupted_wall_s": round(float(full.summary["wall_seconds"]), 2)})


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
