"""``python -m scalesim.run WORLD.yaml [--set KEY=VALUE ...] [--out DIR]``: run a world.

The command loads the configuration, runs it with :func:`scalesim.simulate` and prints the
summary table. Exit status:

    0    completed
    1    failed: an error during the run, a run directory that cannot be written, or more
         failed calls than ``run.max_failed_fraction`` allows (``run.fail_fast``: any)
    2    a configuration error, found before the model loads: one line naming the key or file
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, 129 by SIGHUP (128 + the signal)

The run directory is written in every case but a configuration error or a signal while the
model loads; ``summary.json`` says how the run ended.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from scalesim.config import ConfigError, load_config, parse_override
from scalesim.progress import print_summary
from scalesim.simulation import default_run_dir, simulate
from scalesim.stopping import RunFailed, RunInterrupted


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _written(run_dir: Path | None) -> dict | None:
    """The summary of ``run_dir`` if this run wrote one (a running one after a failed write)."""
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return None
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalesim.run", description="Run a ScaleSim world from its YAML file.")
    parser.add_argument("config", help="the world's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. sim.until=600")
    parser.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument("--debug", action="store_true",
                        help="print the whole traceback of an error (also SCALESIM_DEBUG=1)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="replay the calls recorded in RUN_DIR (an earlier run of this world, "
                             "killed or not) while they match, then go on live")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SCALESIM_DEBUG", "") not in ("", "0")

    run_dir: Path | None = None
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        if args.resume:
            overrides.update({"replay.run": args.resume, "replay.mode": "resume"})
        config = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(config)
        result = simulate(config, out=run_dir, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        if exc.result is not None:
            print_summary(exc.result)
        if debug and exc.cause is not None:
            traceback.print_exception(exc.cause, file=sys.stderr)
        hint = " (--debug: the whole traceback)" if exc.cause is not None and not debug else ""
        print(f"error: run failed: {_first_line(exc)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # RunInterrupted, or Ctrl-C before the run was set up
        stop = exc if isinstance(exc, RunInterrupted) else RunInterrupted(signal.SIGINT)
        if stop.result is not None:
            s = stop.result.summary
            print(f"\ninterrupted by {stop} after {s['calls']} calls ({s['failed_calls']} "
                  f"failed); partial trace written to {run_dir}", file=sys.stderr)
        else:
            print(f"\ninterrupted by {stop} before the run started; nothing written",
                  file=sys.stderr)
        return stop.exit_code
    except Exception as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"error: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        if _written(run_dir) is not None:
            print(f"partial trace written to {run_dir}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
