"""What the user sees while a run goes and when it ends: progress and a summary table.

On a terminal the progress is a live bar; elsewhere (a log file, a pipe, a batch job) a bar
would print nothing until the end, so one plain line is printed every ``every`` seconds instead,
and one when the run ends::

    progress: sim t=412.0 of 1320 (31%), 40 calls (2 failed), 3.21 calls/s, 12 s,
        5.3 sequences / 88 tokens per step

(the engine's occupancy, :mod:`scalesim.occupancy`, once it has run a step).

Both go to stderr, so stdout keeps only the summary table.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scalesim.occupancy import EngineOccupancy
from scalesim.prediction_quality import few_snapshots


class ProgressDisplay:
    """Progress over simulated time with the count of LLM calls (a no-op when disabled).

    ``stream`` is where the plain lines go (default stderr); the live bar is used only when the
    console on stderr is a terminal. ``occupancy`` is the run's engine occupancy, shown too.
    """

    def __init__(self, enabled: bool, until: float | None, every: float = 30.0,
                 stream: IO[str] | None = None,
                 occupancy: EngineOccupancy | None = None) -> None:
        self.enabled = enabled
        self.occupancy = occupancy if occupancy is not None else EngineOccupancy()
        self.until = until
        self.every = every
        self.stream = stream
        self.calls = 0
        self.failed = 0
        self.tokens = 0
        self.now = 0.0
        self._progress: Progress | None = None
        self._task: Any = None
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "ProgressDisplay":
        self._started = time.perf_counter()
        if not self.enabled:
            return self
        console = Console(stderr=True)
        if self.stream is None and console.is_terminal:
            self._progress = Progress(
                TextColumn("sim t={task.fields[now]:>9.1f}"),
                BarColumn(),
                TextColumn("{task.fields[calls]} LLM calls ({task.fields[failed]} failed), "
                           "{task.fields[tokens]} tokens, {task.fields[occupancy]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("run", total=self.until, now=0.0, calls=0,
                                                 failed=0, tokens=0, occupancy="")
        else:
            # A thread, so a line comes on time even while one long engine iteration runs.
            self._ticker = threading.Thread(target=self._tick, name="scalesim-progress",
                                            daemon=True)
            self._ticker.start()
        return self

    def update(self, now: float, completion: Any) -> None:
        self.calls += 1
        self.failed += 0 if completion.ok else 1
        self.tokens += completion.output_tokens
        self.now = now
        if self._progress is not None:
            self._progress.update(self._task, completed=now, now=now, calls=self.calls,
                                  failed=self.failed, tokens=self.tokens,
                                  occupancy=self.occupancy_text())

    def finish(self, now: float) -> None:
        """Show the final simulated time (the clock may pass quiet periods after the last call)."""
        self.now = now
        if self._progress is not None:
            self._progress.update(self._task, completed=now, now=now)

    def line(self) -> str:
        """The plain progress line for the counts so far."""
        wall = time.perf_counter() - self._started
        share = (f" of {self.until:g} ({self.now / self.until:.0%})"
                 if self.until else "")
        rate = self.calls / wall if wall > 0 else 0.0
        occupancy = self.occupancy_text()
        return (f"progress: sim t={self.now:.1f}{share}, {self.calls} calls "
                f"({self.failed} failed), {rate:.2f} calls/s, {wall:.0f} s"
                + (f", {occupancy}" if occupancy else ""))

    def occupancy_text(self) -> str:
        """The engine's sequences and tokens per step so far ('' before its first step; no
        tokens for an executor that serves a request in one call, which counts none)."""
        o = self.occupancy
        if not o.steps:
            return ""
        if not o.tokens:
            return f"{o.sequences_per_step:.1f} sequences per step"
        return f"{o.sequences_per_step:.1f} sequences / {o.tokens_per_step:.0f} tokens per step"

    def _print_line(self) -> None:
        print(self.line(), file=self.stream or sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._print_line()

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
            self._print_line()


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_summary(result: Any, console: Console | None = None) -> None:
    """Print the headline numbers of a finished run as a table."""
    s = result.summary
    table = Table(title=f"ScaleSim run: {s.get('status', '?')}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("LLM calls", f"{s['calls']} ({s['failed_calls']} failed)"),
        ("prompt / cached / output tokens",
         f"{s['prompt_tokens']} / {s['cached_tokens']} / {s['output_tokens']}"),
        ("simulated time", f"{s['sim_time']:g}"),
        ("wall seconds", f"{s['wall_seconds']:.1f}"),
        ("calls / s", f"{s['calls_per_s']:.2f}"),
        ("output tokens / s", f"{s['output_tokens_per_s']:.1f}"),
    ]
    for kind, rate in s.get("hit_rate", {}).items():
        if rate is not None:
            rows.append((f"{kind} hit rate", f"{rate:.1%}"))
    memory = s.get("memory")
    if memory:
        budget = memory["device_bytes"]
        rows.append(("memory policy / device budget",
                     f"{memory['policy']} / {'unlimited' if budget is None else _gib(budget)}"))
        if memory["hit_rate"] is not None:
            rows.append(("memory hit rate", f"{memory['hit_rate']:.1%}"))
        rows.append(("memory loaded / stall", f"{_gib(memory['bytes_loaded'])} / "
                                               f"{memory['stall_s']:.2f} s"))
    occupancy = s.get("occupancy")
    if occupancy and occupancy["steps"]:
        rows.append(("engine occupancy (sequences / tokens per step)",
                     f"{occupancy['sequences_per_step']:.1f} / "
                     f"{occupancy['tokens_per_step']:.0f}"))
        if occupancy["mean_calls_in_flight"]:
            rows.append(("calls in flight (mean over sim time)",
                         f"{occupancy['mean_calls_in_flight']:.1f}"))
    distance = s.get("distance", {})
    if distance.get("kendall_tau") is not None:
        rows.append(("distance prediction (Kendall tau)", f"{distance['kendall_tau']:.3f} "
                     f"({distance.get('snapshots', '?')} snapshots{few_snapshots(distance)})"))
    modeled = s.get("modeled")
    if modeled:
        rows.append((f"modeled makespan ({modeled['model_profile']} on {modeled['hardware']})",
                     f"{modeled['modeled_makespan_s']:.2f} s"))
        rows.append(("modeled stall", f"{modeled['modeled_stall_s']:.2f} s"))
    replay = s.get("replay")
    if replay:
        rows.append((f"replayed calls ({replay['mode']} from {replay['from']})",
                     f"{replay['replayed_calls']} of {replay['recorded_calls']} recorded"))
        live = replay.get("live_from")
        if live:
            rows.append(("went live at", f"call {live['call']} of {live['agent']} (t="
                                         f"{live['sim_time']:g}): {live['reason']}"))
    replicas = s.get("replicas")
    if replicas:
        rows.append((f"engine replicas ({replicas['cluster']})",
                     f"{replicas['count']}, imbalance {replicas['imbalance'] or 0:.2f} "
                     f"(max/mean calls)"))
        for r in replicas["per_replica"]:
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
            state = f" (dead: {r['dead']})" if r["dead"] else ""
            rows.append((f"replica {r['replica']}: calls / hit rate / loaded",
                         f"{r['calls']} / {hit} / {_gib(r['bytes_loaded'])}{state}"))
    if s.get("status") not in (None, "completed") and s.get("error"):
        rows.append(("stopped by", str(s["error"])))
    errors = s.get("errors") or []
    if errors:
        rows.append(("most common error", f"{errors[0]['error']} ({errors[0]['count']} of "
                                          f"{s['failed_calls']} failed)"))
    for key, value in s.get("world", {}).items():
        rows.append((f"world: {key}", str(value)))
    rows.append(("run directory", str(result.run_dir)))
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
