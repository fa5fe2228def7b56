"""Run directories: schema, round trip, and files written when a run fails or is interrupted."""

from __future__ import annotations

import json

import pytest

import scalesim
from runtime import build_engine
from scalesim.trace import MEMORY_SCHEMA, TRACE_SCHEMA, TraceRecorder
from tests.conftest import EchoExecutor


def config(world: str = "Pingers", **params) -> dict:
    return {"world": {"class": f"tests.tiny_world:{world}", "params": params},
            "sim": {"until": 50, "seed": 0}}


def test_empty_frames_have_the_full_schema():
    recorder = TraceRecorder()
    assert list(recorder.trace_frame().columns) == TRACE_SCHEMA.names
    assert list(recorder.memory_frame().columns) == MEMORY_SCHEMA.names


def test_run_writes_and_load_trace_reads_back(tmp_path):
    result = scalesim.simulate(config(agents=3, rounds=2), out=tmp_path, engine=build_engine(EchoExecutor()))
    assert {p.name for p in tmp_path.iterdir()} >= {"trace.parquet", "memory.parquet",
                                                     "summary.json"}
    trace = result.trace
    assert len(trace) == 6 and set(trace["agent"]) == {"p0", "p1", "p2"}
    # max_tokens=4 cuts the echo "p0:round 0" after four characters.
    assert list(trace["completion"][:1]) == ["p0:r"]
    assert (trace["finish_reason"] == "length").all() and (trace["output_tokens"] == 4).all()
    assert (trace["finish_wall"] >= trace["submit_wall"]).all()
    assert (trace["sim_time"] == trace["sim_time_done"]).all()
    assert trace["predicted_rank"].isna().all() or trace["predicted_rank"].notna().all()
    loaded = scalesim.load_trace(tmp_path)
    assert loaded.trace.equals(trace)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["calls"] == 6
    assert summary["config"]["world"]["class"] == "tests.tiny_world:Pingers"
    assert summary["output_tokens"] == int(trace["output_tokens"].sum())


def test_a_failed_run_still_writes_its_trace(tmp_path):
    with pytest.raises(RuntimeError, match="crashed in round 2"):
        scalesim.simulate(config(agents=2, rounds=4, crash_at=2), out=tmp_path,
                     engine=build_engine(EchoExecutor()))
    loaded = scalesim.load_trace(tmp_path)
    assert loaded.summary["status"] == "failed"
    assert "crashed in round 2" in loaded.summary["error"]
    assert len(loaded.trace) >= 2


def test_an_interrupted_run_still_writes_its_trace(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        scalesim.simulate(config("Interrupted"), out=tmp_path, engine=build_engine(EchoExecutor()))
    loaded = scalesim.load_trace(tmp_path)
    assert loaded.summary["status"] == "interrupted"
    assert len(loaded.trace) == 1


def test_load_trace_of_a_wrong_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing trace.parquet"):
        scalesim.load_trace(tmp_path)


def test_keyword_overrides_use_double_underscores(tmp_path):
    result = scalesim.simulate(config(agents=1, rounds=5), out=tmp_path, engine=build_engine(EchoExecutor()),
                          sim__until=2.5)
    assert len(result.trace) == 2 and result.summary["sim_time"] == 2.5


def test_a_failed_run_closes_its_engine(tmp_path):
    from fake_engine import FakeEngine

    engine = FakeEngine()
    with pytest.raises(RuntimeError, match="crashed in round 2"):
        scalesim.simulate(config(agents=2, rounds=4, crash_at=2), out=tmp_path, engine=engine)
    assert engine.closed and scalesim.load_trace(tmp_path).summary["status"] == "failed"
