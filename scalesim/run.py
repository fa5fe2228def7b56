"""``python -m scalesim.run WORLD.yaml [--set KEY=VALUE ...] [--out DIR]``: run a world.

The command loads the configuration, runs it with :func:`scalesim.simulate` and prints the
summary table. Exit status: 0 completed, 2 a configuration error (one line naming the key or
file), 1 an error during the run, 130 interrupted with Ctrl-C; the run directory is written in
every case but a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from scalesim.config import ConfigError, load_config, parse_override
from scalesim.progress import print_summary
from scalesim.simulation import default_run_dir, simulate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalesim.run", description="Run a ScaleSim world from its YAML file."
    )
    parser.add_argument("config", help="the world's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. sim.until=600")
    parser.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    run_dir: Path | None = None
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        config = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(config)
        result = simulate(config, out=run_dir, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; partial trace written to {run_dir}", file=sys.stderr)
        return 130
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first_line}", file=sys.stderr)
        if run_dir is not None and (run_dir / "summary.json").exists():
            print(f"partial trace written to {run_dir}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
