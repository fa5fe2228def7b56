"""What the user sees while a run goes and when it ends: a progress bar and a summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class ProgressDisplay:
    """A live bar over simulated time with the count of LLM calls done (a no-op when disabled)."""

    def __init__(self, enabled: bool, until: float | None) -> None:
        self.enabled = enabled
        self.until = until
        self.calls = 0
        self.tokens = 0
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled:
            self._progress = Progress(
                TextColumn("sim t={task.fields[now]:>9.1f}"),
                BarColumn(),
                TextColumn("{task.fields[calls]} LLM calls, {task.fields[tokens]} tokens"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("run", total=self.until, now=0.0, calls=0,
                                                 tokens=0)
        return self

    def update(self, now: float, completion: Any) -> None:
        self.calls += 1
        self.tokens += completion.output_tokens
        if self._progress is not None:
            self._progress.update(self._task, completed=now, now=now, calls=self.calls,
                                  tokens=self.tokens)

    def finish(self, now: float) -> None:
        """Show the final simulated time (the clock may pass quiet periods after the last call)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=now, now=now)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


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
    tau = s.get("distance", {}).get("kendall_tau")
    if tau is not None:
        rows.append(("distance prediction (Kendall tau)", f"{tau:.3f}"))
    modeled = s.get("modeled")
    if modeled:
        rows.append((f"modeled makespan ({modeled['model_profile']} on {modeled['hardware']})",
                     f"{modeled['modeled_makespan_s']:.2f} s"))
        rows.append(("modeled stall", f"{modeled['modeled_stall_s']:.2f} s"))
    for key, value in s.get("world", {}).items():
        rows.append((f"world: {key}", str(value)))
    rows.append(("run directory", str(result.run_dir)))
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
