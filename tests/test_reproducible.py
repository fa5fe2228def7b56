"""A seeded run is the same run in every process.

Python salts the hash of strings per process (``PYTHONHASHSEED``), so anything that iterates a
set of agent names in the simulation or the distance sources orders its work differently from
one process to the next. The market world of the prediction suite (its oracle distrusts a source
and re-estimates every agent, and its turn orders end) must give the same makespans and the
same prediction quality under two different salts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _market_line(seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-m", "experiments.prediction_suite", "--quick",
                           "--worlds", "market"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return next(line for line in lines if line.get("world") == "market")


@pytest.mark.slow
def test_a_seeded_modeled_run_does_not_depend_on_the_hash_salt() -> None:
    assert _market_line("1") == _market_line("2")
