"""The run's record under faults: flushed parts, a full disk, and an adapter broken mid-run."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

import scalesim
from runtime import Completion, build_engine
from scalesim import simulation, trace as trace_module
from scalesim.run import main
from scalesim.trace import MEMORY_SCHEMA, TRACE_SCHEMA, RecordError, TraceRecorder
from tests.conftest import EchoExecutor


def record(recorder: TraceRecorder, n: int, start: int = 0) -> None:
    """Record ``n`` finished calls (every third one failed)."""
    for i in range(start, start + n):
        error = "request %d: boom" % i if i % 3 == 2 else None
        call = SimpleNamespace(submit_time=float(i), request=SimpleNamespace(prompt=f"p{i}", due=None),
                               predicted_rank=None)
        done = Completion(i, f"a{i % 2}", "" if error else "ok", 3, 0, 0 if error else 1,
                          "error" if error else "stop", 1.0, None, 2.0, error=error)
        recorder.record_call(call, done, float(i))


def names(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_rows_reach_the_disk_in_parts_while_the_run_goes(tmp_path):
    recorder = TraceRecorder()
    recorder.open(tmp_path, flush_calls=2, flush_seconds=3600, config={"k": 1})
    running = scalesim.load_trace(tmp_path)
    assert running.summary["status"] == "running" and running.summary["config"] == {"k": 1}
    assert len(running.trace) == 0 and list(running.trace.columns) == TRACE_SCHEMA.names
    record(recorder, 5)
    assert names(tmp_path) == ["memory.parts", "summary.json", "trace.parts",
                               "trace.parts/part-000001.parquet", "trace.parts/part-000002.parquet"]
    running = scalesim.load_trace(tmp_path)
    assert list(running.trace["request_id"]) == [0, 1, 2, 3]  # the fifth waits for the next flush
    assert running.summary["calls"] == 3 and running.summary["failed_calls"] == 1
    assert running.summary["flushed_calls"] == 4
    result = recorder.write(tmp_path, sim_time=9.0, status="completed")
    assert names(tmp_path) == ["memory.parquet", "summary.json", "trace.parquet"]
    loaded = scalesim.load_trace(tmp_path)
    assert loaded.trace.equals(result.trace) and len(loaded.trace) == 5
    assert loaded.summary["errors"] == [{"error": "boom", "count": 1}]
    # What the parts held reads back exactly as the final file does.
    assert loaded.trace.iloc[:4].reset_index(drop=True).equals(running.trace)


def test_a_flush_is_also_due_after_flush_seconds(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(trace_module.time, "perf_counter", lambda: now[0])
    recorder = TraceRecorder()
    recorder.open(tmp_path, flush_calls=1000, flush_seconds=9)
    now[0] += 5
    record(recorder, 1)
    assert not list((tmp_path / "trace.parts").iterdir())
    now[0] += 5
    record(recorder, 1, start=1)
    assert len(list((tmp_path / "trace.parts").iterdir())) == 1


def test_open_clears_what_an_earlier_run_left(tmp_path):
    old = TraceRecorder()
    record(old, 3)
    old.write(tmp_path, sim_time=3.0, status="completed")
    (tmp_path / "trace.parts").mkdir()
    (tmp_path / "trace.parts" / "part-000001.parquet").write_text("stale")
    (tmp_path / "report.md").write_text("kept")
    TraceRecorder().open(tmp_path)
    assert names(tmp_path) == ["memory.parts", "report.md", "summary.json", "trace.parts"]
    assert len(scalesim.load_trace(tmp_path).trace) == 0


def test_a_killed_flush_leaves_only_a_hidden_temporary_file(tmp_path):
    recorder = TraceRecorder()
    recorder.open(tmp_path, flush_calls=2)
    record(recorder, 2)
    (tmp_path / "trace.parts" / ".part-000002.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert len(scalesim.load_trace(tmp_path).trace) == 2


def test_memory_rows_are_flushed_too(tmp_path):
    recorder = TraceRecorder()
    recorder.open(tmp_path, flush_calls=1)
    recorder.record_memory(wall=0.0, sim_time=0.0, object="adapter:a", kind="adapter",
                           op="load", bytes=10, tier_from="host", tier_to="device", cause="x",
                           distance=0.0)
    record(recorder, 1)
    memory = scalesim.load_trace(tmp_path).memory
    assert list(memory.columns) == MEMORY_SCHEMA.names and list(memory["op"]) == ["load"]


# -- a full disk ----------------------------------------------------------------------------------


def full_disk(monkeypatch, after: int = 0, recovers: bool = False) -> list[str]:
    """``pq.write_table`` succeeds ``after`` times, then writes half a file and raises ENOSPC
    (once if ``recovers``). Returns the paths it refused."""
    real = pq.write_table
    refused: list[str] = []

    def write_table(table, where, **kwargs):
        if len(refused) < (1 if recovers else 10**9) and write_table.calls >= after:
            Path(where).write_bytes(b"PAR1" + b"\0" * 100)  # what a full disk leaves behind
            refused.append(str(where))
            raise OSError(errno.ENOSPC, "No space left on device")
        write_table.calls += 1
        return real(table, where, **kwargs)

    write_table.calls = 0
    monkeypatch.setattr(trace_module.pq, "write_table", write_table)
    return refused


def pingers(**output) -> dict:
    return {"world": {"class": "tests.tiny_world:Pingers", "params": {"agents": 2, "rounds": 4}},
            "sim": {"until": 50}, "output": output}


def run(cfg: dict, tmp_path: Path):
    return scalesim.simulate(cfg, out=tmp_path, engine=build_engine(EchoExecutor()))


def no_temporary_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_at_the_final_write(tmp_path, monkeypatch):
    full_disk(monkeypatch)
    with pytest.raises(RecordError, match=r"cannot write .*trace\.parquet: No space left on "
                                          r"device"):
        run(pingers(), tmp_path)
    assert names(tmp_path) == ["memory.parts", "summary.json", "trace.parts"]
    assert no_temporary_files(tmp_path)
    loaded = scalesim.load_trace(tmp_path)   # no final files, and none claimed
    assert loaded.summary["status"] == "failed"
    assert loaded.summary["error"].startswith("RecordError: cannot write")
    assert loaded.summary["calls"] == 8 and loaded.summary["flushed_calls"] == 0
    assert len(loaded.trace) == 0   # nothing was flushed before the end


def test_a_disk_that_fills_up_mid_run(tmp_path, monkeypatch):
    refused = full_disk(monkeypatch, after=1)   # the first part is written, then nothing
    with pytest.raises(RecordError, match="No space left on device"):
        run(pingers(flush_calls=2), tmp_path)
    assert "part-000002" in refused[0] and "trace.parquet" in refused[1]
    assert no_temporary_files(tmp_path) and not (tmp_path / "trace.parquet").exists()
    loaded = scalesim.load_trace(tmp_path)   # the summary says failed, the parts are the record
    assert loaded.summary["status"] == "failed" and loaded.summary["flushed_calls"] == 2
    error = loaded.summary["error"]
    assert error.startswith(f"RecordError: cannot write {tmp_path / 'trace.parquet'}: No space")
    assert error.endswith("the run had stopped on RecordError: cannot write "
                          f"{tmp_path / 'trace.parts' / 'part-000002.parquet'}: No space left "
                          "on device")
    assert list(loaded.trace["request_id"]) == [0, 1]


def test_a_failed_flush_stops_the_run_even_if_the_disk_recovers(tmp_path, monkeypatch):
    full_disk(monkeypatch, after=0, recovers=True)
    with pytest.raises(RecordError):
        run(pingers(flush_calls=2), tmp_path)
    loaded = scalesim.load_trace(tmp_path)   # complete final files, saying why the run stopped
    assert names(tmp_path) == ["memory.parquet", "summary.json", "trace.parquet"]
    assert loaded.summary["status"] == "failed" and "RecordError" in loaded.summary["error"]
    assert len(loaded.trace) == loaded.summary["calls"] == 2 and loaded.summary["sim_time"] == 1


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulation, "assemble_engine",
                        lambda runtime, **keywords: build_engine(EchoExecutor()))
    full_disk(monkeypatch)
    world = tmp_path / "w.yaml"
    world.write_text("world: {class: tests.tiny_world:Pingers}\nsim: {until: 50}\n")
    assert main([str(world), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: RecordError: cannot write") and "No space left" in err[0]


# -- an adapter file broken after the checks ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("executor", ["torch", "hf"])
def test_an_adapter_corrupted_mid_run_fails_only_its_calls(tmp_path, hf, smol_engine, executor):
    from experiments.make_adapters import make_adapters
    from runtime.model.profiles import PROFILES

    make_adapters(tmp_path / "adapters", PROFILES["smollm2-135m"], n=2, rank=4)
    engine = smol_engine if executor == "hf" else build_engine(
        "torch", hf_model=hf[0], tokenizer=hf[1], kv_cache_tokens=2048)
    cfg = {"world": {"class": "tests.fault_worlds:Adapted",
                     "params": {"adapter_dir": str(tmp_path / "adapters"), "rounds": 3,
                                "corrupt_at": 0.5}},
           # Declared agents would have their adapters read at the start, before the damage.
           "runtime": {"executor": executor, "memory": {"declare_agents": False}},
           "sim": {"until": 50}}
    result = scalesim.simulate(cfg, out=tmp_path / "run", engine=engine)
    trace, summary = result.trace, result.summary
    assert summary["status"] == "completed"   # 3 of 6 calls failed: not more than half
    assert trace[trace["agent"] == "a0"]["error"].isna().all()
    broken = trace[trace["agent"] == "a1"]
    assert len(broken) == 3 and broken["error"].str.contains("adapter-001").all()
    assert summary["errors"][0]["count"] == 3 and "adapter-001" in summary["errors"][0]["error"]


def test_a_killed_run_can_be_reported(tmp_path):
    from scalesim.report import write_report

    recorder = TraceRecorder()
    recorder.open(tmp_path, flush_calls=2, config={"world": {"class": "w:W"}})
    record(recorder, 4)   # then the process dies: no final write
    text = write_report(tmp_path).read_text()
    assert "status: **running** (still going, or killed" in text
    assert "| LLM calls (failed) | 3 (1) |" in text
