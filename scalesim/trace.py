"""The run's record: one row per LLM call, one row per memory operation, and a summary.

:class:`TraceRecorder` collects rows while the simulation runs and writes the run directory::

    trace.parquet    one row per LLM call (TRACE_SCHEMA)
    memory.parquet   one row per memory operation (MEMORY_SCHEMA)
    summary.json     totals, rates, status and the configuration

:func:`load_trace` reads a run directory back as a :class:`RunResult` of pandas DataFrames.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from runtime import Completion

MEMORY_KINDS = ("adapter", "prefix_kv", "model")

TRACE_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("agent", pa.string()),
        ("sim_time", pa.float64()),
        ("sim_time_done", pa.float64()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("submit_wall", pa.float64()),
        ("first_token_wall", pa.float64()),
        ("finish_wall", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        *[(f"hits_{k}", pa.int64()) for k in MEMORY_KINDS],
        *[(f"misses_{k}", pa.int64()) for k in MEMORY_KINDS],
        ("bytes_loaded", pa.int64()),
        ("stall_s", pa.float64()),
        ("predicted_rank", pa.int64()),
    ]
)

MEMORY_SCHEMA = pa.schema(
    [
        ("wall", pa.float64()),
        ("sim_time", pa.float64()),
        ("object", pa.string()),
        ("kind", pa.string()),
        ("op", pa.string()),
        ("bytes", pa.int64()),
        ("tier_from", pa.string()),
        ("tier_to", pa.string()),
        ("cause", pa.string()),
        ("distance", pa.float64()),
    ]
)


@dataclass
class RunResult:
    """What a run leaves behind, as Python objects."""

    trace: pd.DataFrame
    memory: pd.DataFrame
    summary: dict[str, Any]
    run_dir: Path | None = None


class TraceRecorder:
    """Collects call and memory rows during a run; writes the run directory."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.memory_ops: list[dict[str, Any]] = []
        self.started_wall = time.perf_counter()

    def record_call(self, call: Any, completion: Completion, sim_time_done: float) -> None:
        """Append the row of one finished (or failed) call; ``call`` is an ``LLMCall``."""
        mem = completion.memory
        row = {
            "request_id": completion.request_id,
            "agent": completion.agent_id,
            "sim_time": float(call.submit_time),
            "sim_time_done": float(sim_time_done),
            "prompt": call.request.prompt,
            "completion": completion.text,
            "finish_reason": completion.finish_reason,
            "error": completion.error,
            "submit_wall": completion.submit_wall - self.started_wall,
            "first_token_wall": (completion.first_token_wall - self.started_wall
                                 if completion.first_token_wall is not None else None),
            "finish_wall": completion.finish_wall - self.started_wall,
            "prompt_tokens": completion.prompt_tokens,
            "cached_tokens": completion.cached_tokens,
            "output_tokens": completion.output_tokens,
            "bytes_loaded": mem.bytes_loaded,
            "stall_s": mem.stall_s,
            "predicted_rank": call.predicted_rank,
        }
        for kind in MEMORY_KINDS:
            row[f"hits_{kind}"] = mem.hits.get(kind, 0)
            row[f"misses_{kind}"] = mem.misses.get(kind, 0)
        self.calls.append(row)

    def record_memory(self, **row: Any) -> None:
        self.memory_ops.append(row)

    def trace_frame(self) -> pd.DataFrame:
        return pa.Table.from_pylist(self.calls, schema=TRACE_SCHEMA).to_pandas()

    def memory_frame(self) -> pd.DataFrame:
        return pa.Table.from_pylist(self.memory_ops, schema=MEMORY_SCHEMA).to_pandas()

    def summarize(self, trace: pd.DataFrame, sim_time: float, **extra: Any) -> dict[str, Any]:
        wall = time.perf_counter() - self.started_wall
        ok = trace[trace["error"].isna()] if len(trace) else trace
        out_tokens = int(ok["output_tokens"].sum()) if len(ok) else 0
        summary: dict[str, Any] = {
            "calls": int(len(ok)),
            "failed_calls": int(len(trace) - len(ok)),
            "prompt_tokens": int(ok["prompt_tokens"].sum()) if len(ok) else 0,
            "cached_tokens": int(ok["cached_tokens"].sum()) if len(ok) else 0,
            "output_tokens": out_tokens,
            "sim_time": float(sim_time),
            "wall_seconds": round(wall, 3),
            "calls_per_s": round(len(ok) / wall, 4) if wall > 0 else 0.0,
            "output_tokens_per_s": round(out_tokens / wall, 3) if wall > 0 else 0.0,
            "hit_rate": {},
        }
        for kind in MEMORY_KINDS:
            hits = int(trace[f"hits_{kind}"].sum()) if len(trace) else 0
            misses = int(trace[f"misses_{kind}"].sum()) if len(trace) else 0
            summary["hit_rate"][kind] = round(hits / (hits + misses), 4) if hits + misses else None
        summary.update(extra)
        return summary

    def write(self, run_dir: Path, sim_time: float, **extra: Any) -> RunResult:
        """Write the three files (even for a failed run) and return them as a RunResult."""
        run_dir.mkdir(parents=True, exist_ok=True)
        trace, memory = self.trace_frame(), self.memory_frame()
        summary = self.summarize(trace, sim_time, **extra)
        pq.write_table(pa.Table.from_pylist(self.calls, schema=TRACE_SCHEMA),
                       run_dir / "trace.parquet")
        pq.write_table(pa.Table.from_pylist(self.memory_ops, schema=MEMORY_SCHEMA),
                       run_dir / "memory.parquet")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return RunResult(trace, memory, summary, run_dir)


def load_trace(run_dir: str | Path) -> RunResult:
    """Read a run directory written by :meth:`TraceRecorder.write`."""
    run_dir = Path(run_dir)
    missing = [n for n in ("trace.parquet", "memory.parquet", "summary.json")
               if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a run directory: missing {', '.join(missing)}")
    return RunResult(
        trace=pd.read_parquet(run_dir / "trace.parquet"),
        memory=pd.read_parquet(run_dir / "memory.parquet"),
        summary=json.loads((run_dir / "summary.json").read_text()),
        run_dir=run_dir,
    )
