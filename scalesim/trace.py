"""The run's record: one row per LLM call, one row per memory operation, and a summary.

:class:`TraceRecorder` collects rows while the simulation runs and writes the run directory::

    trace.parquet    one row per LLM call (TRACE_SCHEMA)
    memory.parquet   one row per memory operation (MEMORY_SCHEMA)
    summary.json     totals, rates, status and the configuration

Once :meth:`TraceRecorder.open` has started a run directory, the rows also reach the disk while
the run goes: every ``flush_calls`` calls or ``flush_seconds`` wall seconds the new rows are
written as one more part file (``trace.parts/part-NNNNNN.parquet``, ``memory.parts/...``) and
``summary.json`` is rewritten with status ``running`` and the totals so far. A run killed
without warning (SIGKILL, a power cut) therefore keeps every call up to its last flush. The
final files replace the parts when the run ends, however it ends.

Every file is written under a hidden temporary name, synced and renamed over its final name, so
no reader and no crash ever sees a half-written file under a name it would trust. A write that
fails (a full disk) raises :class:`RecordError` naming the file.

:func:`load_trace` reads a run directory back as a :class:`RunResult` of pandas DataFrames: the
final files, or the parts of a run that is still going or was killed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from runtime import Completion, Request
from runtime.request import SamplingParams

# pandas is imported where frames are made (by pyarrow's to_pandas), at the end of a run: at the
# start its import would delay the first call by a few tenths of a second.
if TYPE_CHECKING:
    import pandas as pd

MEMORY_KINDS = ("adapter", "prefix_kv", "model")

TRACE_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("agent", pa.string()),
        ("sim_time", pa.float64()),
        ("sim_time_done", pa.float64()),
        ("due", pa.float64()),
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
        # what a replay matches and delivers by (scalesim/replay.py)
        ("agent_call", pa.int64()),
        ("request_hash", pa.string()),
        ("sampling", pa.string()),
        ("adapter", pa.string()),
        ("iteration", pa.int64()),
        ("replayed", pa.bool_()),
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

SUMMARY_FILE = "summary.json"
#: table name -> (final file, directory of the parts flushed while the run goes, schema)
TABLES: dict[str, tuple[str, str, pa.Schema]] = {
    "trace": ("trace.parquet", "trace.parts", TRACE_SCHEMA),
    "memory": ("memory.parquet", "memory.parts", MEMORY_SCHEMA),
}

# Errors that differ only in the request they name are one kind of error.
_REQUEST_PREFIX = re.compile(r"^request \d+(?: of agent (?:'[^']*'|\"[^\"]*\"))?: ")


def request_hash(request: Request) -> str:
    """A digest of everything the model reads for ``request``: persona, history and prompt.

    It is the BLAKE2b digest of the JSON text ``[prefix, history, prompt]`` (keys sorted), fed
    in parts that repeat call after call and are encoded once: the digest's state after the
    persona (:func:`_after_persona`) and each plain ``{role, content}`` turn
    (:func:`_turn_part`). That took this from ~35 us per recorded call to a few.
    """
    digest = _after_persona(request.prefix).copy()
    history = request.history
    if history:
        digest.update(b"[")
        for k, turn in enumerate(history):
            if k:
                digest.update(b", ")
            digest.update(_turn_part(turn))
        digest.update(b"], ")
    else:
        digest.update(b"[], ")
    digest.update(json.dumps(request.prompt, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    digest.update(b"]")
    return digest.hexdigest()


#: At most this many personas and turns are remembered (then they are encoded afresh).
_REMEMBERED = 1 << 14
_PERSONAS: dict[str, Any] = {}
_TURNS: dict[tuple[str, str], bytes] = {}


def _after_persona(prefix: str) -> Any:
    """The digest's state after ``[prefix, `` (not to be updated: copy it)."""
    state = _PERSONAS.get(prefix)
    if state is None:
        if len(_PERSONAS) >= _REMEMBERED:
            _PERSONAS.clear()
        state = _PERSONAS[prefix] = hashlib.blake2b(digest_size=16)
        state.update(b"[" + _json_bytes(prefix) + b", ")
    return state


def _turn_part(turn: Any) -> bytes:
    """One history turn as sorted-key JSON (remembered for plain role/content turns)."""
    role, content = turn.get("role"), turn.get("content")
    plain = len(turn) == 2 and isinstance(role, str) and isinstance(content, str)
    if not plain:
        return _json_bytes(dict(turn), sort_keys=True, default=str)
    part = _TURNS.get((role, content))
    if part is None:
        if len(_TURNS) >= _REMEMBERED:
            _TURNS.clear()
        part = _TURNS[role, content] = _json_bytes({"content": content, "role": role})
    return part


def _json_bytes(value: Any, **options: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, **options).encode("utf-8", "surrogatepass")


def sampling_text(request: Request) -> str:
    """The sampling parameters of ``request`` as one comparable string (with its output
    constraint, where it has one)."""
    text = _sampling_text(request.sampling)
    constraint = request.constraint
    if constraint is None:
        return text
    return text[:-1] + ", " + json.dumps({"constraint": [constraint.kind, constraint.spec]})[1:]


@functools.lru_cache(maxsize=1024)
def _sampling_text(s: SamplingParams) -> str:
    return json.dumps({"max_tokens": s.max_tokens, "temperature": s.temperature,
                       "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed, "stop": list(s.stop),
                       "ignore_eos": s.ignore_eos}, sort_keys=True)


class RecordError(RuntimeError):
    """The run directory could not be written; the message names the file and the reason."""


@dataclass
class RunResult:
    """What a run leaves behind, as Python objects."""

    trace: pd.DataFrame
    memory: pd.DataFrame
    summary: dict[str, Any]
    run_dir: Path | None = None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a :class:`RecordError` naming it."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RecordError(f"cannot write {path}: {reason}") from exc


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a hidden temporary file, synced, then renamed over ``path``.

    On any error (or an interrupt) the temporary file is removed, so what carries the final name
    is always a whole file: the new one, or whatever was there before.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error is the one to report
        raise
    try:  # make the rename itself durable; not every filesystem lets a directory be synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    _replace_atomically(path, write)


def _write_table(path: Path, table: pa.Table) -> None:
    _replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def error_counts(errors: Iterable[str], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` most common of ``errors``, each with its count: ``[{"error", "count"}]``.

    Messages that differ only in the request they start with (``request 12 of agent 'ada': ...``)
    count as one error.
    """
    kinds = Counter(_REQUEST_PREFIX.sub("", str(e)) for e in errors)
    return [{"error": text, "count": n} for text, n in kinds.most_common(top)]


class TraceRecorder:
    """Collects call and memory rows during a run; flushes and writes the run directory."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.memory_ops: list[dict[str, Any]] = []
        self.started_wall = time.perf_counter()
        #: The directory rows are flushed to as the run goes (set by :meth:`open`).
        self.run_dir: Path | None = None
        self.flush_calls = 1000
        self.flush_seconds = 10.0
        #: The error that stopped flushing (rows are still kept for the final write).
        self.flush_error: RecordError | None = None
        self._context: dict[str, Any] = {}
        self._flushed = {"trace": 0, "memory": 0}
        self._parts = 0
        self._last_flush = self.started_wall
        # Running totals for the summary of a run still going (recomputing them from all rows
        # at every flush would cost a large run quadratic time).
        self._ok = self._failed = 0
        self._tokens = {"prompt_tokens": 0, "cached_tokens": 0, "output_tokens": 0}
        self._sim_time = 0.0

    def record_call(self, call: Any, completion: Completion, sim_time_done: float) -> None:
        """Append the row of one finished (or failed) call; ``call`` is an ``LLMCall``.

        May flush (see :meth:`open`); a failed flush raises :class:`RecordError` once, and later
        rows are kept in memory only.
        """
        mem = completion.memory
        row = {
            "request_id": completion.request_id,
            "agent": completion.agent_id,
            "sim_time": float(call.submit_time),
            "sim_time_done": float(sim_time_done),
            "due": call.request.due,  # None for a served request: it has no simulated clock
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
            "agent_call": call.position,
            "request_hash": request_hash(call.request),
            "sampling": sampling_text(call.request),
            "adapter": call.request.adapter or "",
            "iteration": call.iteration,
            "replayed": call.replayed,
        }
        for kind in MEMORY_KINDS:
            row[f"hits_{kind}"] = mem.hits.get(kind, 0)
            row[f"misses_{kind}"] = mem.misses.get(kind, 0)
        self.calls.append(row)
        if completion.ok:
            self._ok += 1
            for key in self._tokens:
                self._tokens[key] += row[key]
        else:
            self._failed += 1
        self._sim_time = max(self._sim_time, float(sim_time_done))
        self._maybe_flush()

    def record_memory(self, **row: Any) -> None:
        self.memory_ops.append(row)
        self._maybe_flush()

    def trace_frame(self) -> pd.DataFrame:
        return pa.Table.from_pylist(self.calls, schema=TRACE_SCHEMA).to_pandas()

    def memory_frame(self) -> pd.DataFrame:
        return pa.Table.from_pylist(self.memory_ops, schema=MEMORY_SCHEMA).to_pandas()

    # -- the run directory while the run goes ---------------------------------------------------

    def open(self, run_dir: str | Path, *, flush_calls: int = 1000, flush_seconds: float = 10.0,
             **context: Any) -> None:
        """Start ``run_dir``: flush new rows there from now on, and write a ``running`` summary.

        What an earlier run left in the directory (its trace, memory log and parts) is removed
        first, so that nothing of it can be read as part of this run. ``context`` goes into every
        running summary (the configuration, say).
        """
        run_dir = Path(run_dir)
        with _writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            for final, parts, _ in TABLES.values():
                (run_dir / final).unlink(missing_ok=True)
                if (run_dir / parts).exists():
                    shutil.rmtree(run_dir / parts)
                # Empty until the first flush: the table exists, with no rows yet.
                (run_dir / parts).mkdir()
        self.run_dir = run_dir
        self.flush_calls, self.flush_seconds = flush_calls, flush_seconds
        self._context = context
        self._last_flush = time.perf_counter()
        _write_json(run_dir / SUMMARY_FILE, self.running_summary())

    def running_summary(self) -> dict[str, Any]:
        """The summary of a run still going: its totals so far and who is writing it."""
        wall = time.perf_counter() - self.started_wall
        return {
            "status": "running", "calls": self._ok, "failed_calls": self._failed,
            **self._tokens, "sim_time": self._sim_time, "wall_seconds": round(wall, 3),
            "calls_per_s": round(self._ok / wall, 4) if wall > 0 else 0.0,
            "output_tokens_per_s": (round(self._tokens["output_tokens"] / wall, 3)
                                    if wall > 0 else 0.0),
            "flushed_calls": self._flushed["trace"], "pid": os.getpid(),
            "host": socket.gethostname(), **self._context,
        }

    def _maybe_flush(self) -> None:
        if self.run_dir is None or self.flush_error is not None:
            return
        due = (len(self.calls) - self._flushed["trace"] >= self.flush_calls
               or time.perf_counter() - self._last_flush >= self.flush_seconds)
        if due:
            try:
                self.flush()
            except RecordError as exc:
                self.flush_error = exc
                raise

    def flush(self) -> None:
        """Write the rows recorded since the last flush as part files, then the running summary."""
        if self.run_dir is None:
            raise RuntimeError("flush() needs a run directory: call open() first")
        self._last_flush = time.perf_counter()
        # A new number per attempt: a part that was written stays, whatever fails after it.
        self._parts += 1
        wrote = False
        for name, (_, parts, schema) in TABLES.items():
            rows = self.calls if name == "trace" else self.memory_ops
            done = self._flushed[name]
            if len(rows) > done:
                table = pa.Table.from_pylist(rows[done:], schema=schema)
                _write_table(self.run_dir / parts / f"part-{self._parts:06d}.parquet", table)
                self._flushed[name] = len(rows)
                wrote = True
        if wrote:
            _write_json(self.run_dir / SUMMARY_FILE, self.running_summary())

    # -- the final files ------------------------------------------------------------------------

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
            "errors": error_counts(trace["error"].dropna()),
        }
        for kind in MEMORY_KINDS:
            hits = int(trace[f"hits_{kind}"].sum()) if len(trace) else 0
            misses = int(trace[f"misses_{kind}"].sum()) if len(trace) else 0
            summary["hit_rate"][kind] = round(hits / (hits + misses), 4) if hits + misses else None
        summary.update(extra)
        return summary

    def write(self, run_dir: str | Path, sim_time: float, **extra: Any) -> RunResult:
        """Write the three files (even for a failed run) and return them as a RunResult.

        The trace and memory log go first, the summary last; the part files are removed once all
        three are in place. If a file cannot be written, the parts stay (they are the record),
        a summary saying so is attempted, and :class:`RecordError` is raised.
        """
        run_dir = Path(run_dir)
        trace_table = pa.Table.from_pylist(self.calls, schema=TRACE_SCHEMA)
        memory_table = pa.Table.from_pylist(self.memory_ops, schema=MEMORY_SCHEMA)
        trace, memory = trace_table.to_pandas(), memory_table.to_pandas()
        summary = self.summarize(trace, sim_time, **extra)
        try:
            _write_table(run_dir / TABLES["trace"][0], trace_table)
            _write_table(run_dir / TABLES["memory"][0], memory_table)
            _write_json(run_dir / SUMMARY_FILE, summary)
        except RecordError as exc:
            self._record_failure(run_dir, summary, exc)
            raise
        for directory in {run_dir, self.run_dir or run_dir}:
            for _, parts, _ in TABLES.values():
                shutil.rmtree(directory / parts, ignore_errors=True)
        return RunResult(trace, memory, summary, run_dir)

    def _record_failure(self, run_dir: Path, summary: dict[str, Any], exc: RecordError) -> None:
        """Say in summary.json, if it can still be written, that the record is incomplete."""
        stopped = f"; the run had stopped on {summary['error']}" if summary.get("error") else ""
        summary = {**summary, "status": "failed", "error": f"RecordError: {exc}{stopped}",
                   "flushed_calls": self._flushed["trace"]}
        try:
            _write_json(run_dir / SUMMARY_FILE, summary)
        except RecordError:
            pass  # the disk is full: the running summary stays, the error is raised anyway


def _read_table(run_dir: Path, name: str) -> pd.DataFrame | None:
    """A table of ``run_dir``: its final file, else its parts in order; None if neither."""
    final, parts, schema = TABLES[name]
    if (run_dir / final).is_file():
        import pandas as pd

        return pd.read_parquet(run_dir / final)
    if (run_dir / parts).is_dir():
        # Only whole parts carry a .parquet name; a temporary file of a killed flush is hidden.
        files = sorted((run_dir / parts).glob("part-*.parquet"))
        tables = [pq.read_table(f, schema=schema) for f in files]
        return (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()
    return None


def load_trace(run_dir: str | Path) -> RunResult:
    """Read a run directory written by :class:`TraceRecorder`.

    A run that ended (completed, failed, interrupted) is read from its final files. A run still
    going, or killed without warning, has a ``running`` summary and is read from the parts
    flushed so far (empty tables when none was flushed yet).
    """
    run_dir = Path(run_dir)
    tables = {name: _read_table(run_dir, name) for name in TABLES}
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    running = summary is not None and summary.get("status") == "running"
    missing = [TABLES[name][0] for name, table in tables.items() if table is None]
    if summary is None or (missing and not running):
        missing += [SUMMARY_FILE] if summary is None else []
        raise FileNotFoundError(f"{run_dir} is not a run directory: missing {', '.join(missing)}")
    frames = {name: table if table is not None else TABLES[name][2].empty_table().to_pandas()
              for name, table in tables.items()}
    return RunResult(trace=frames["trace"], memory=frames["memory"], summary=summary,
                     run_dir=run_dir)
