"""Where the experiments write their CSV and PNG files.

Full runs write to ``experiments/results/`` (committed, quoted in experiments/README.md); a
``--quick`` run writes to ``results/quick/`` (ignored by git), so trying an experiment never
overwrites a full run's results. Tests point ``SCALESIM_RESULTS`` at a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def results_dir(quick: bool = False) -> Path:
    """The directory an experiment writes to, created if missing."""
    root = Path(os.environ.get("SCALESIM_RESULTS", Path(__file__).parent / "results"))
    path = root / "quick" if quick else root
    path.mkdir(parents=True, exist_ok=True)
    return path
