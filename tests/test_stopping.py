"""Signals: SIGINT, SIGTERM and SIGHUP stop a run cleanly; SIGKILL leaves the flushed calls.

The in-process tests send a signal from inside a world (the handler :func:`scalesim.simulate`
installs then sees it). The subprocess tests run ``python -m scalesim.run`` and kill it at a
random moment after its first flushed calls are on disk: on the modeled executor (no model to
load, so they are quick) and, marked slow, on the real SmolLM2-135M.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scalesim
from runtime import build_engine
from scalesim import RunInterrupted, simulation
from tests.conftest import EchoExecutor

ROOT = Path(__file__).resolve().parents[1]


def signalled(*signals: str) -> dict:
    return {"world": {"class": "tests.fault_worlds:Signalled",
                      "params": {"signals": list(signals), "rounds": 5}},
            "sim": {"until": 50}}


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_stops_at_a_safe_point_and_writes_the_run(tmp_path, name, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(RunInterrupted) as info:
        scalesim.simulate(signalled(name), out=tmp_path, engine=build_engine(EchoExecutor()))
    assert info.value.exit_code == code and str(info.value) == name
    assert isinstance(info.value, KeyboardInterrupt)  # code that cleans up after Ctrl-C still does
    run = scalesim.load_trace(tmp_path)
    assert run.summary["status"] == "interrupted" and run.summary["error"] == name
    assert run.summary["world"]["went_on"]  # the world's code ran on to the next safe point
    assert len(run.trace) == 2 and run.trace["error"].isna().all()  # the calls at t=1 and t=2
    assert info.value.result is not None and info.value.result.trace.equals(run.trace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.parquet", "summary.json",
                                                          "trace.parquet"]
    # The Python API leaves the handlers as it found them.
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_stops_at_once(tmp_path):
    with pytest.raises(RunInterrupted):
        scalesim.simulate(signalled("SIGTERM", "SIGTERM"), out=tmp_path,
                          engine=build_engine(EchoExecutor()))
    run = scalesim.load_trace(tmp_path)
    assert run.summary["status"] == "interrupted" and not run.summary["world"]["went_on"]


def test_a_signal_while_the_model_loads_writes_nothing(tmp_path, monkeypatch):
    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the load")

    monkeypatch.setattr(simulation, "assemble_engine", load)
    with pytest.raises(RunInterrupted) as info:
        scalesim.simulate(signalled(), out=tmp_path / "run")
    assert info.value.result is None and not (tmp_path / "run").exists()


def test_the_world_raising_keyboard_interrupt_is_an_interrupt(tmp_path):
    with pytest.raises(RunInterrupted) as info:
        scalesim.simulate({"world": {"class": "tests.tiny_world:Interrupted"},
                           "sim": {"until": 50}}, out=tmp_path,
                          engine=build_engine(EchoExecutor()))
    assert info.value.exit_code == 130
    assert scalesim.load_trace(tmp_path).summary["error"] == "SIGINT"


# -- a real process, killed ---------------------------------------------------------------------


def start(tmp_path: Path, config: str, *sets: str) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scalesim.run", config, "--out", str(run_dir),
               "--set", "output.flush_calls=2", "--set", "output.progress_every=0.2"]
    for item in sets:
        command += ["--set", item]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, run_dir


def kill_after_first_flush(proc: subprocess.Popen, run_dir: Path, signum: int,
                           timeout: float = 300) -> tuple[int, str, float]:
    """Wait until calls are flushed, then a random moment more; send ``signum``."""
    deadline = time.monotonic() + timeout
    while not list((run_dir / "trace.parts").glob("part-*.parquet")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no flushed calls (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    delay = random.uniform(0, 1.0)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err, delay


def assert_every_row_completed(trace) -> None:
    """Each row is a call that finished: an answer or an error, and wall times in order."""
    assert len(trace) > 0
    assert trace["finish_reason"].isin(["stop", "length", "error"]).all()
    assert (trace["error"].notna() == (trace["finish_reason"] == "error")).all()
    assert (trace["finish_wall"] >= trace["submit_wall"]).all()
    assert (trace["sim_time_done"] >= trace["sim_time"]).all()
    assert trace["request_id"].is_unique


def slow_world(tmp_path: Path) -> str:
    path = tmp_path / "slow.yaml"
    path.write_text("world: {class: tests.fault_worlds:Slow, params: {agents: 2, rounds: 100, "
                    "pause: 0.03}}\nruntime: {executor: modeled, model: smollm2-135m}\n")
    return str(path)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_cli_exits_128_plus_the_signal_with_the_run_written(tmp_path, name):
    signum = getattr(signal, name)
    proc, run_dir = start(tmp_path, slow_world(tmp_path))
    rc, err, delay = kill_after_first_flush(proc, run_dir, signum)
    assert rc == 128 + signum, (delay, err)
    assert f"interrupted by {name} after" in err and "progress: sim t=" in err
    run = scalesim.load_trace(run_dir)
    assert run.summary["status"] == "interrupted" and run.summary["error"] == name
    assert_every_row_completed(run.trace)
    assert run.summary["calls"] + run.summary["failed_calls"] == len(run.trace)
    assert sorted(p.name for p in run_dir.iterdir()) == ["memory.parquet", "summary.json",
                                                         "trace.parquet"]


def test_sigkill_leaves_the_calls_flushed_so_far(tmp_path):
    proc, run_dir = start(tmp_path, slow_world(tmp_path))
    rc, err, delay = kill_after_first_flush(proc, run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (run_dir / "trace.parquet").exists()
    run = scalesim.load_trace(run_dir)
    assert run.summary["status"] == "running" and run.summary["pid"] == proc.pid
    assert_every_row_completed(run.trace)
    assert len(run.trace) >= run.summary["calls"] + run.summary["failed_calls"] >= 2, delay
    assert list(run.memory.columns) == list(scalesim.trace.MEMORY_SCHEMA.names)


TOWN = ["world.params.villagers=6", "world.params.max_tokens=4", "world.params.reflect_every=0",
        "output.flush_calls=1"]


@pytest.mark.slow
@pytest.mark.model
def test_sigterm_on_the_real_model(tmp_path):
    proc, run_dir = start(tmp_path, "worlds/town.yaml", *TOWN)
    rc, err, delay = kill_after_first_flush(proc, run_dir, signal.SIGTERM)
    assert rc == 143, (delay, err)
    run = scalesim.load_trace(run_dir)
    assert run.summary["status"] == "interrupted"
    assert_every_row_completed(run.trace)
    assert not (run_dir / "trace.parts").exists()


@pytest.mark.slow
@pytest.mark.model
def test_sigkill_on_the_real_model(tmp_path):
    proc, run_dir = start(tmp_path, "worlds/town.yaml", *TOWN)
    rc, err, delay = kill_after_first_flush(proc, run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    run = scalesim.load_trace(run_dir)
    assert run.summary["status"] == "running"
    assert_every_row_completed(run.trace)
    assert run.trace["completion"].str.len().gt(0).any()  # real replies, not placeholders
