"""The server's run directory (``--trace DIR``): the same files as a simulation run.

``trace.parquet`` has one row per served request in the simulation schema
(:data:`scalesim.trace.TRACE_SCHEMA`; ``sim_time`` is the server's clock, seconds since it
started, and ``predicted_rank`` is empty), ``memory.parquet`` one row per memory operation, and
``summary.json`` the totals with hit rates per kind. ``requests.parquet`` adds what only a
server knows, per request id (``/v1/embeddings`` requests too, which make no trace row): the
resolved agent, where that identity came from (``header``,
``scalesim.agent``, ``prompt_cache_key``, ``user``, ``model``, ``system_hash``, ``default``),
the endpoint, the model field, the adapter and the session's clock, and its outcome: every
request has a row there, also one refused before it reached the engine (``outcome``
``refused``, its HTTP ``status`` and ``error``: a 400 naming a field, a 404, a 413, a 429), with
the server's clock at the time. Rows reach the disk in parts while the server runs, and the
final files are written when it shuts down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runtime import Completion, Request
from runtime.memory.events import MemoryEvent
from scalesim.trace import RunResult, TraceRecorder

REQUESTS_FILE = "requests.parquet"
REQUESTS_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("agent", pa.string()), ("identity_source", pa.string()),
    ("endpoint", pa.string()), ("model", pa.string()), ("adapter", pa.string()),
    ("session", pa.string()), ("session_clock", pa.float64()), ("outcome", pa.string()),
    ("status", pa.int64()), ("error", pa.string()), ("time", pa.float64()),
    # the field or server setting that constrained the reply (None: free text)
    ("constraint", pa.string()),
])


@dataclass
class ServedCall:
    """What :meth:`TraceRecorder.record_call` reads of a call, for a served request."""

    request: Request
    submit_time: float
    predicted_rank: int | None = None
    #: a served request is no agent's numbered call of a simulation (see scalesim/replay.py)
    position: int = 0
    iteration: int = 0
    replayed: bool = False


class ServeRecorder:
    """Trace rows of served requests, written as a run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path, context: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.trace = TraceRecorder()
        self.trace.open(self.run_dir, flush_seconds=5.0, **context)
        self.context = context
        self.requests: list[dict[str, Any]] = []

    def now(self) -> float:
        return time.perf_counter() - self.trace.started_wall

    def memory_row(self, event: MemoryEvent) -> None:
        self.trace.record_memory(sim_time=self.now(), **event.row())

    def call(self, request: Request, submit_time: float, completion: Completion,
             info: dict[str, Any]) -> None:
        self.trace.record_call(ServedCall(request, submit_time), completion, self.now())
        status = info.get("status", {"ok": 200, "error": 400}.get(info.get("outcome", "")))
        self.requests.append({"request_id": completion.request_id, "error": completion.error,
                              "time": self.now(), **info, "status": status})

    def refused(self, endpoint: str, status: int, error: str | None,
                info: dict[str, Any] | None = None, outcome: str = "refused") -> None:
        """A request answered without an engine completion (any thread: one list append):
        refused before the engine served it (``outcome`` ``refused``), failed on its way
        (``error``, ``cancelled``), or an embedding request (``ok`` too)."""
        self.requests.append({"request_id": -1, **(info or {}), "endpoint": endpoint,
                              "outcome": outcome, "status": status, "error": error,
                              "time": self.now()})

    def write(self, status: str, **extra: Any) -> RunResult:
        """Write the final files; ``extra`` goes into ``summary.json``."""
        table = pa.Table.from_pylist(self.requests, schema=REQUESTS_SCHEMA)
        pq.write_table(table, self.run_dir / REQUESTS_FILE)
        sources: dict[str, int] = {}
        served = [row for row in self.requests
                  if row["outcome"] != "refused" and row.get("endpoint") != "embeddings"]
        for row in served:
            sources[row["identity_source"]] = sources.get(row["identity_source"], 0) + 1
        agents = len({row["agent"] for row in served})
        return self.trace.write(self.run_dir, self.now(), status=status, agents=agents,
                                identity_sources=sources,
                                refused_requests=sum(row["outcome"] == "refused"
                                                     for row in self.requests),
                                embedding_requests=sum(row.get("endpoint") == "embeddings"
                                                       and row["outcome"] != "refused"
                                                       for row in self.requests),
                                **self.context, **extra)
