"""Errors in a world's own code name the world's file and line: in the run's error, in the
command line's one line, with the whole traceback behind ``--debug``."""

from __future__ import annotations

from pathlib import Path

import pytest

import scalesim
from runtime import build_engine
from scalesim.run import main
from scalesim.stopping import RunFailed
from tests.conftest import EchoExecutor

WORLD_FILE = Path(__file__).resolve().parent / "tiny_world.py"


def crashing() -> dict:
    return {"world": {"class": "tests.tiny_world:Pingers",
                      "params": {"agents": 2, "rounds": 4, "crash_at": 2}},
            "runtime": {"executor": "modeled", "model": "smollm2-135m"}, "sim": {"until": 20}}


def crash_line() -> int:
    return next(i for i, line in enumerate(WORLD_FILE.read_text().splitlines(), start=1)
                if "crashed in round" in line)


def test_simulate_raises_run_failed_naming_the_worlds_line(tmp_path):
    with pytest.raises(RunFailed) as info:
        scalesim.simulate(crashing(), out=tmp_path, engine=build_engine(EchoExecutor()))
    failed = info.value
    assert isinstance(failed.cause, RuntimeError) and failed.__cause__ is failed.cause
    assert f"tiny_world.py:{crash_line()} in run" in str(failed)
    assert "RuntimeError: p0 crashed in round 2" in str(failed)
    assert failed.result is not None and failed.result.summary["status"] == "failed"
    assert f"tiny_world.py:{crash_line()}" in scalesim.load_trace(tmp_path).summary["error"]


def test_the_cli_prints_one_line_and_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    yaml = tmp_path / "w.yaml"
    yaml.write_text("world: {class: tests.tiny_world:Pingers, params: {rounds: 4, crash_at: 1}}\n"
                    "runtime: {executor: modeled, model: smollm2-135m}\nsim: {until: 20}\n")
    assert main([str(yaml), "--out", str(tmp_path / "a"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run failed: ") and f"tiny_world.py:{crash_line()} in run (" in err
    assert "raise RuntimeError" in err and "--debug" in err
    monkeypatch.setenv("SCALESIM_DEBUG", "1")
    assert main([str(yaml), "--out", str(tmp_path / "b"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "--debug" not in err.splitlines()[-1]


def test_a_setup_error_is_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from scalesim import simulation

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the world was set up")

    monkeypatch.setattr(simulation, "assemble_engine", load)
    yaml = tmp_path / "w.yaml"
    yaml.write_text("world: {class: worlds.traffic:Traffic, params: {size: 1}}\n"
                    "runtime: {executor: torch, model: smollm2-135m}\n")
    assert main([str(yaml), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "world.params: Traffic.setup failed: " in err
    assert "traffic.py:" in err and "ValueError: world.params.size must be >= 2" in err
    assert not (tmp_path / "run").exists()
