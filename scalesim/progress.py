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
    for key, value in s.get("world", {}).items():
        rows.append((f"world: {key}", str(value)))
    rows.append(("run directory", str(result.run_dir)))
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
