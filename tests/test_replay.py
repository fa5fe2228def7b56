"""Resuming runs and the call cache (scalesim/replay.py): a run replayed from an earlier run's
record, then live, gives the trace an uninterrupted run gives."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import scalesim
from scalesim.config import ConfigError
from scalesim.run import main

ROOT = Path(__file__).resolve().parents[1]
#: what must be identical between an uninterrupted run and a resumed one
SAME = ["agent", "sim_time", "sim_time_done", "prompt", "completion", "agent_call"]

TOWN = {"world": {"class": "worlds.town:Town", "params": {"villagers": 8}},
        "runtime": {"executor": "modeled", "model": "qwen2.5-7b"},
        "sim": {"until": 1440, "seed": 3}}


def pingers(executor: str = "modeled", **params) -> dict:
    """Three agents, four calls each; on the torch executor with random weights (sampling
    happens there: the modeled executor's replies ignore it), else on the modeled one."""
    runtime = {"executor": executor, "model": "smollm2-135m"}
    if executor == "torch":
        runtime.update(random_weights=True, threads=1)
    return {"world": {"class": "tests.tiny_world:Pingers", "params": {"agents": 3, "rounds": 4,
                                                                     **params}},
            "runtime": runtime, "sim": {"until": 10, "seed": 5}}


def calls(run) -> pd.DataFrame:
    return run.trace[SAME].reset_index(drop=True)


def test_a_run_stopped_half_way_and_resumed_is_the_uninterrupted_run(tmp_path):
    full = scalesim.simulate(TOWN, out=tmp_path / "full")
    half = scalesim.simulate(TOWN, out=tmp_path / "half", sim__until=720)
    assert 0 < len(half.trace) < len(full.trace)
    resumed = scalesim.simulate(TOWN, out=tmp_path / "resumed", resume=tmp_path / "half")
    pd.testing.assert_frame_equal(calls(resumed), calls(full))
    replay = resumed.summary["replay"]
    assert replay["replayed_calls"] == replay["recorded_calls"] == len(half.trace)
    assert replay["live_from"]["reason"] == "end of record"
    assert resumed.trace.replayed.sum() == len(half.trace)
    assert resumed.trace.request_id.is_unique


@pytest.mark.slow
def test_seeded_sampling_resumes_exactly(tmp_path):
    sampled = pingers("torch", temperature=0.9)
    full = scalesim.simulate(sampled, out=tmp_path / "full")
    half = scalesim.simulate(sampled, out=tmp_path / "half", sim__until=3)
    resumed = scalesim.simulate(sampled, out=tmp_path / "resumed", resume=tmp_path / "half")
    pd.testing.assert_frame_equal(calls(resumed), calls(full))
    assert 0 < resumed.summary["replay"]["replayed_calls"] < len(full.trace)
    assert full.trace.completion.nunique() > 1  # sampled: the replies differ


def test_an_edited_world_goes_live_where_it_diverges(tmp_path):
    scalesim.simulate(pingers(), out=tmp_path / "first")
    edited = scalesim.simulate(pingers(reword_from=2), out=tmp_path / "edited",
                               resume=tmp_path / "first")
    live = edited.summary["replay"]["live_from"]
    assert live["call"] == 2 and live["reason"].startswith("prompt")
    assert edited.summary["replay"]["replayed_calls"] == live["after_replayed"]
    assert list(edited.trace.replayed) == [c < 2 for c in edited.trace.agent_call][:len(edited.trace)]
    assert (edited.trace[~edited.trace.replayed].prompt.str.endswith("reworded")).all()


def test_the_call_cache_answers_every_call_that_matches(tmp_path):
    first = scalesim.simulate(pingers(), out=tmp_path / "first")
    again = scalesim.simulate(pingers(), out=tmp_path / "again",
                              replay__run=str(tmp_path / "first"), replay__mode="cache")
    assert again.trace.replayed.all() and again.summary["replay"]["replayed_calls"] == len(first.trace)
    pd.testing.assert_frame_equal(calls(again), calls(first))
    edited = scalesim.simulate(pingers(reword_from=3), out=tmp_path / "edited",
                               replay__run=str(tmp_path / "first"), replay__mode="cache")
    assert list(edited.trace.replayed) == [c < 3 for c in edited.trace.agent_call]


@pytest.mark.parametrize("key, value, named", [("sim__seed", 6, "sim.seed"),
                                               ("runtime__model", "qwen2.5-0.5b", "runtime.model")])
def test_a_record_of_another_seed_or_model_is_refused(tmp_path, key, value, named):
    scalesim.simulate(pingers(), out=tmp_path / "first")
    with pytest.raises(ConfigError, match=f"recorded with {named}="):
        scalesim.simulate(pingers(), out=tmp_path / "second", resume=tmp_path / "first",
                          **{key: value})
    assert not (tmp_path / "second").exists()


def test_unusable_records_are_refused_with_one_line(tmp_path, capsys):
    scalesim.simulate(pingers(), out=tmp_path / "first")
    trace = pd.read_parquet(tmp_path / "first" / "trace.parquet")
    unseeded = trace.assign(sampling=trace.sampling.str.replace('"temperature": 0.0',
                                                                '"temperature": 0.7'))
    old = trace.drop(columns=["agent_call", "iteration"])
    for name, table in [("unseeded", unseeded), ("old", old)]:
        shutil.copytree(tmp_path / "first", tmp_path / name)
        table.to_parquet(tmp_path / name / "trace.parquet")
    for record, message in [("unseeded", "without a seed"), ("old", "recorded before runs"),
                            ("absent", "no run record there"), ("first", "own directory")]:
        out = tmp_path / ("first" if record == "first" else "new")
        with pytest.raises(ConfigError, match=message):
            scalesim.simulate(pingers(), out=out, resume=tmp_path / record)
    yaml = tmp_path / "w.yaml"
    yaml.write_text("world: {class: tests.tiny_world:Pingers}\nsim: {until: 3, seed: 9}\n"
                    "runtime: {executor: modeled, model: smollm2-135m}\n")
    assert main([str(yaml), "--resume", str(tmp_path / "first"), "--out",
                 str(tmp_path / "cli"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sim.seed" in err


def kill_half_way_then_resume(tmp_path: Path, config: str, sets: list[str],
                              flush_calls: int) -> None:
    """Run ``config`` uninterrupted; run it again in a process killed with SIGKILL once about
    half of its calls are flushed; resume that; the resumed trace must be the first one."""
    full_dir, killed_dir, resumed_dir = tmp_path / "full", tmp_path / "killed", tmp_path / "res"
    assert main([config, *sets, "--out", str(full_dir), "--no-progress"]) == 0
    total = len(scalesim.load_trace(full_dir).trace)
    proc = subprocess.Popen([sys.executable, "-m", "scalesim.run", config, *sets, "--out",
                             str(killed_dir), "--no-progress", "--set",
                             f"output.flush_calls={flush_calls}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list((killed_dir / "trace.parts").glob("part-*.parquet"))
        if len(parts) * flush_calls >= total // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    recorded = len(scalesim.load_trace(killed_dir).trace)
    assert 0 < recorded < total
    assert main([config, *sets, "--out", str(resumed_dir), "--resume", str(killed_dir),
                 "--no-progress"]) == 0
    resumed, full = scalesim.load_trace(resumed_dir), scalesim.load_trace(full_dir)
    pd.testing.assert_frame_equal(calls(resumed), calls(full))
    assert resumed.summary["replay"]["replayed_calls"] == recorded


@pytest.mark.slow
def test_a_killed_large_modeled_run_resumed_is_the_uninterrupted_run(tmp_path):
    kill_half_way_then_resume(tmp_path, str(ROOT / "worlds" / "town_large.yaml"),
                              ["--set", "runtime.executor=modeled", "--set",
                               "world.params.villagers=200", "--set", "sim.until=900"], 50)


@pytest.mark.slow
@pytest.mark.model
def test_a_killed_town_on_the_real_model_resumed_is_the_uninterrupted_run(tmp_path):
    kill_half_way_then_resume(tmp_path, str(ROOT / "worlds" / "town.yaml"),
                              ["--set", "world.params.villagers=3", "--set", "sim.until=600",
                               "--set", "world.params.max_tokens=8"], 1)


def test_calls_that_take_time_resume_exactly(tmp_path):
    """With a call duration, replayed answers are held until their due time like live ones."""
    timed = {**TOWN, "sim": {**TOWN["sim"], "call_duration": 7.0}}
    full = scalesim.simulate(timed, out=tmp_path / "full")
    scalesim.simulate(timed, out=tmp_path / "half", sim__until=720)
    resumed = scalesim.simulate(timed, out=tmp_path / "resumed", resume=tmp_path / "half")
    pd.testing.assert_frame_equal(calls(resumed), calls(full))
    assert resumed.summary["replay"]["replayed_calls"] > 0
    assert (full.trace.sim_time_done > full.trace.sim_time).any()
