"""Progress where no terminal shows a live bar: one plain line every few seconds."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import scalesim
from runtime import build_engine
from scalesim.progress import ProgressDisplay
from tests.conftest import EchoExecutor

LINE = re.compile(r"^progress: sim t=\d+\.\d( of \d+ \(\d+%\))?, \d+ calls \(\d+ failed\), "
                  r"\d+\.\d\d calls/s, \d+ s(, \d+\.\d sequences( / \d+ tokens)? per step)?$")


def test_plain_lines_come_on_time_and_at_the_end():
    out = io.StringIO()
    with ProgressDisplay(enabled=True, until=200, every=0.05, stream=out) as display:
        for i in range(3):
            display.update(50.0 * (i + 1), SimpleNamespace(ok=i != 1, output_tokens=2))
        time.sleep(0.3)
        display.finish(200.0)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("progress: sim t=200.0 of 200 (100%), 3 calls (1 failed)")


def test_a_disabled_display_prints_nothing():
    out = io.StringIO()
    with ProgressDisplay(enabled=False, until=None, every=0.01, stream=out) as display:
        display.update(1.0, SimpleNamespace(ok=True, output_tokens=1))
        time.sleep(0.05)
    assert out.getvalue() == ""


def test_a_run_without_a_terminal_logs_progress_lines(tmp_path, capsys):
    # Under pytest stderr is no terminal, as in a batch job or `> log 2>&1`.
    config = {"world": {"class": "tests.fault_worlds:Slow",
                        "params": {"agents": 2, "rounds": 10, "pause": 0.02}},
              "output": {"progress_every": 0.05}}
    scalesim.simulate(config, out=tmp_path, engine=build_engine(EchoExecutor()), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("progress: sim t=10.0, 20 calls (0 failed)")
    # the engine's occupancy: the two agents' calls of each instant share every step
    assert lines[-1].endswith(", 2.0 sequences per step")
