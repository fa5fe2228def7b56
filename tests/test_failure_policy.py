"""The failure policy: a run whose calls mostly failed fails loudly (``run`` section)."""

from __future__ import annotations

import pytest

import scalesim
from runtime import build_engine
from scalesim import RunFailed, simulation
from scalesim.config import ConfigError, load_config
from scalesim.run import main
from tests.conftest import EchoExecutor


def failing(agents: int = 4, rejected: int = 4, **run) -> dict:
    return {"world": {"class": "tests.fault_worlds:Failing",
                      "params": {"agents": agents, "rejected": rejected, "rounds": 3}},
            "sim": {"until": 50}, "run": run}


def simulate(cfg: dict, tmp_path):
    return scalesim.simulate(cfg, out=tmp_path, engine=build_engine(EchoExecutor()))


def test_a_run_where_every_call_failed_fails(tmp_path):
    with pytest.raises(RunFailed) as info:
        simulate(failing(), tmp_path)
    message = str(info.value)
    assert message.startswith("12 of 12 calls failed, more than run.max_failed_fraction=0.5")
    assert "most common (12x): the echo executor rejects it" in message
    summary = scalesim.load_trace(tmp_path).summary
    assert summary["status"] == "failed" and summary["error"] == f"RunFailed: {message}"
    assert summary["errors"] == [{"error": "the echo executor rejects it", "count": 12}]
    assert info.value.result is not None and info.value.result.summary == summary


@pytest.mark.parametrize("rejected, limit, status", [
    (1, 0.5, "completed"),   # 25% failed
    (2, 0.5, "completed"),   # exactly at the limit passes
    (3, 0.5, "failed"),
    (3, 0.8, "completed"),
    (4, 1.0, "completed"),   # 1.0: never fails at the end
    (1, 0.0, "failed"),      # 0: any failed call fails the run
])
def test_the_share_of_failed_calls_decides(tmp_path, rejected, limit, status):
    cfg = failing(rejected=rejected, max_failed_fraction=limit)
    if status == "failed":
        with pytest.raises(RunFailed):
            simulate(cfg, tmp_path)
    else:
        assert simulate(cfg, tmp_path).summary["failed_calls"] == 3 * rejected
    assert scalesim.load_trace(tmp_path).summary["status"] == status


def test_fail_fast_stops_at_the_first_failed_call(tmp_path):
    with pytest.raises(RunFailed, match="run.fail_fast: request 0 of agent 'c0' failed: "
                                        "request 0: the echo executor rejects it"):
        simulate(failing(rejected=1, fail_fast=True), tmp_path)
    run = scalesim.load_trace(tmp_path)
    assert run.summary["status"] == "failed" and run.summary["sim_time"] == 1
    # A rejection finishes in the first engine iteration; the run stops right after it, with the
    # three other calls of t=1 still in flight (the echo executor answers a character a step).
    assert len(run.trace) == 1 and run.trace["error"].notna().all()
    assert run.summary["unfinished_calls"] == 3


def test_the_cli_exits_1_and_names_the_most_common_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulation, "assemble_engine",
                        lambda runtime, **keywords: build_engine(EchoExecutor()))
    monkeypatch.setenv("COLUMNS", "200")
    world = tmp_path / "failing.yaml"
    world.write_text("world: {class: tests.fault_worlds:Failing, params: {rejected: 3}}\n"
                     "sim: {until: 50}\n")
    assert main([str(world), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "ScaleSim run: failed" in out
    assert "the echo executor rejects it (9 of 9 failed)" in out
    assert err.startswith("error: run failed: 9 of 12 calls failed")
    assert main([str(world), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "run.max_failed_fraction=0.9"]) == 0


@pytest.mark.parametrize("override, expected", [
    ({"run.fail_fst": True}, "run.fail_fst: unknown key"),
    ({"run.max_failed_fraction": 1.5}, "run.max_failed_fraction: Input should be less than"),
    ({"run.fail_fast": "sometimes"}, "run.fail_fast: Input should be a valid boolean"),
])
def test_the_run_section_gives_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(failing(), override)
    assert expected in str(info.value) and "\n" not in str(info.value)
