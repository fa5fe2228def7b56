"""Plots and a markdown summary of a run: ``python -m scalesim.report RUN_DIR``.

The command reads a run directory (:func:`scalesim.load_trace`) and writes into it (or ``--out``)::

    calls_over_time.png     LLM calls per sim-time bin and the share of agents active in it
    activation.png          one row per agent, a mark at every call (who is active when)
    latency_cdf.png         CDF of finish_wall - submit_wall
    hit_rate.png            device hit rate per memory kind over the run ("no memory data" if none)
    bytes_by_kind.png       bytes moved per memory kind and operation (from memory.parquet)
    report.md               the numbers (with the distance oracle's Kendall tau when recorded),
                            the world's metrics, and the plots

Every plot is a function of the DataFrames of :func:`scalesim.load_trace`, usable from a notebook:
each takes an optional matplotlib ``ax`` and returns the figure it drew on (a ``SubFigure`` when
``ax`` lies on one). Figures are built with :class:`matplotlib.figure.Figure` (no pyplot), so
importing this module never switches a notebook's backend; PNGs are rendered by Agg.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from scalesim.prediction_quality import few_snapshots
from scalesim.trace import MEMORY_KINDS, RunResult, load_trace

PLOTS = ("calls_over_time", "activation", "latency_cdf", "hit_rate", "bytes_by_kind")


def _axes(ax: Axes | None,
          size: tuple[float, float] = (7, 3.6)) -> tuple[Figure | SubFigure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _ok(trace: pd.DataFrame) -> pd.DataFrame:
    return trace[trace["error"].isna()] if len(trace) else trace


def agent_count(trace: pd.DataFrame, summary: dict[str, Any] | None = None) -> int:
    """Agents in the world (from the summary's world metrics), else agents seen in the trace."""
    world = (summary or {}).get("world") or {}
    return int(world.get("agents") or trace["agent"].nunique() or 0)


def activity(trace: pd.DataFrame, agents: int, bins: int = 48) -> pd.DataFrame:
    """Per sim-time bin: ``start``, ``calls`` and ``active_share`` (agents calling / agents).

    There are at most as many bins as distinct call times, so a world that acts on a clock
    (every hour, say) gets one bin per tick rather than empty bins in between.
    """
    ok = _ok(trace)
    if not len(ok):
        return pd.DataFrame({"start": [], "calls": [], "active_share": []})
    bins = max(1, min(bins, ok["sim_time"].nunique()))
    lo, hi = float(ok["sim_time"].min()), float(ok["sim_time"].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    which = np.clip(np.searchsorted(edges, ok["sim_time"], side="right") - 1, 0, bins - 1)
    grouped = ok.assign(bin=which).groupby("bin")
    calls = grouped.size().reindex(range(bins), fill_value=0)
    active = grouped["agent"].nunique().reindex(range(bins), fill_value=0)
    return pd.DataFrame({"start": edges[:-1], "calls": calls.to_numpy(),
                         "active_share": active.to_numpy() / max(agents, 1)})


def plot_calls_over_time(trace: pd.DataFrame, agents: int | None = None, bins: int = 48,
                         ax: Axes | None = None) -> Figure | SubFigure:
    """Bars: LLM calls per sim-time bin; line: share of all agents that called in the bin."""
    fig, ax = _axes(ax)
    if not len(_ok(trace)):
        _empty(ax, "no LLM calls")
        return fig
    agents = agents or trace["agent"].nunique()
    act = activity(trace, agents, bins)
    width = (act["start"].iloc[1] - act["start"].iloc[0]) if len(act) > 1 else 1.0
    ax.bar(act["start"], act["calls"], width=width, align="edge", color="tab:blue", alpha=0.7)
    ax.set_xlabel("simulated time")
    ax.set_ylabel("LLM calls per bin", color="tab:blue")
    share = ax.twinx()
    # Markers, not a line: joining the bins would draw spikes through the empty ones.
    share.plot(act["start"] + width / 2, 100 * act["active_share"], color="tab:red", marker="o",
               markersize=4, linestyle="none")
    share.set_ylabel("% of agents active", color="tab:red")
    share.set_ylim(0, max(5, 100 * act["active_share"].max() * 1.1))
    ax.set_title(f"Activation sparsity ({agents} agents; mean "
                 f"{100 * act['active_share'].mean():.1f}% active per bin)")
    return fig


def plot_activation(trace: pd.DataFrame, max_agents: int = 80,
                    ax: Axes | None = None) -> Figure | SubFigure:
    """One row per agent (the first ``max_agents`` by first call), a tick at each call."""
    fig, ax = _axes(ax, (7, 4.5))
    ok = _ok(trace)
    if not len(ok):
        _empty(ax, "no LLM calls")
        return fig
    order = ok.groupby("agent")["sim_time"].min().sort_values().index[:max_agents]
    rows = [ok.loc[ok["agent"] == a, "sim_time"].to_numpy() for a in order]
    ax.eventplot(rows, lineoffsets=range(len(rows)), linelengths=0.9, linewidths=2.5,
                 colors="tab:blue")
    if len(rows) <= 30:
        ax.set_yticks(range(len(rows)), list(order), fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_ylabel("agents, by first call")
    ax.set_xlabel("simulated time")
    ax.grid(axis="x", alpha=0.3)
    shown = "" if ok["agent"].nunique() <= max_agents else f" (first {max_agents} agents)"
    ax.set_title(f"Per-agent LLM calls{shown}")
    return fig


def latencies(trace: pd.DataFrame) -> pd.Series:
    """Wall seconds from submit to finish of every successful call."""
    ok = _ok(trace)
    return (ok["finish_wall"] - ok["submit_wall"]).rename("latency_s")


def plot_latency_cdf(trace: pd.DataFrame, ax: Axes | None = None) -> Figure | SubFigure:
    fig, ax = _axes(ax)
    lat = np.sort(latencies(trace).to_numpy())
    if not len(lat):
        _empty(ax, "no LLM calls")
        return fig
    ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post")
    for q, style in ((0.5, ":"), (0.9, "--")):
        ax.axvline(np.quantile(lat, q), color="0.5", linestyle=style,
                   label=f"p{int(q * 100)} = {np.quantile(lat, q):.2f} s")
    ax.set_xlabel("latency: finish - submit (wall seconds)")
    ax.set_ylabel("share of calls")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title("Latency CDF (includes queueing behind other calls)")
    return fig


def has_memory_data(trace: pd.DataFrame) -> bool:
    cols = [f"{s}_{k}" for s in ("hits", "misses") for k in MEMORY_KINDS]
    return bool(len(trace)) and bool(trace[cols].fillna(0).to_numpy().sum() > 0)


def hit_rates(trace: pd.DataFrame, bins: int = 30) -> pd.DataFrame:
    """Device hit rate per memory kind per bin of calls (in finish order); NaN where unused."""
    ordered = trace.sort_values("finish_wall").reset_index(drop=True)
    which = np.minimum(np.arange(len(ordered)) * bins // max(len(ordered), 1), bins - 1)
    grouped = ordered.assign(bin=which).groupby("bin")
    out = pd.DataFrame({"finish_wall": grouped["finish_wall"].max()})
    for kind in MEMORY_KINDS:
        hits, misses = grouped[f"hits_{kind}"].sum(), grouped[f"misses_{kind}"].sum()
        out[kind] = (hits / (hits + misses)).where(hits + misses > 0)
    return out


def plot_hit_rate(trace: pd.DataFrame, ax: Axes | None = None) -> Figure | SubFigure:
    fig, ax = _axes(ax)
    if not has_memory_data(trace):
        _empty(ax, "no memory data (this executor records no hits or misses)")
        ax.set_title("Device hit rate over time")
        return fig
    rates = hit_rates(trace)
    for kind in MEMORY_KINDS:
        if rates[kind].notna().any():
            ax.plot(rates["finish_wall"], 100 * rates[kind], marker=".", label=kind)
    ax.set_xlabel("wall seconds since start")
    ax.set_ylabel("device hit rate (%)")
    ax.set_ylim(0, 102)
    ax.legend()
    ax.set_title("Device hit rate over time")
    return fig


def bytes_moved(memory: pd.DataFrame) -> pd.DataFrame:
    """Bytes per (kind, op), largest first; empty when nothing was recorded."""
    if not len(memory):
        return pd.DataFrame(columns=["kind", "op", "bytes"])
    return (memory.groupby(["kind", "op"], as_index=False)["bytes"].sum()
            .sort_values("bytes", ascending=False, ignore_index=True))


def plot_bytes_by_kind(memory: pd.DataFrame, ax: Axes | None = None) -> Figure | SubFigure:
    fig, ax = _axes(ax)
    moved = bytes_moved(memory)
    if not len(moved):
        _empty(ax, "no memory operations recorded")
        ax.set_title("Bytes moved by kind")
        return fig
    table = moved.pivot_table(index="kind", columns="op", values="bytes", fill_value=0)
    bottom = np.zeros(len(table))
    for op in table.columns:
        ax.bar(table.index, table[op] / 2**20, bottom=bottom, label=op)
        bottom += table[op].to_numpy() / 2**20
    ax.set_ylabel("MiB")
    ax.legend(title="operation")
    ax.set_title("Bytes moved by kind")
    return fig


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown(result: RunResult, plots: Sequence[str] = PLOTS) -> str:
    """The text of report.md for ``result``; ``plots`` are the PNG stems to embed."""
    trace, summary = result.trace, result.summary
    agents = agent_count(trace, summary)
    act = activity(trace, agents)
    lat = latencies(trace)
    lines = [f"# Run report: {result.run_dir.name if result.run_dir else 'run'}", ""]
    config = summary.get("config") or {}
    world_cls = (config.get("world") or {}).get("class", "?")
    runtime = config.get("runtime") or {}
    lines += [f"- world: `{world_cls}`, executor `{runtime.get('executor', '?')}`, model "
              f"`{runtime.get('model', '?')}`",
              f"- status: **{summary.get('status', '?')}**"
              + (f" ({summary['error']})" if summary.get("error") else "")
              + (" (still going, or killed: the calls flushed so far)"
                 if summary.get("status") == "running" else ""),
              f"- sim time reached: {summary.get('sim_time', float('nan')):g}; wall: "
              f"{summary.get('wall_seconds', float('nan')):g} s", ""]
    lines += ["| measure | value |", "|---|---|",
              f"| LLM calls (failed) | {summary.get('calls', len(_ok(trace)))} "
              f"({summary.get('failed_calls', 0)}) |",
              f"| agents / agents that called | {agents} / {trace['agent'].nunique()} |",
              f"| calls per agent (mean) | {len(_ok(trace)) / max(agents, 1):.2f} |"]
    if len(act):
        lines.append(f"| agents active per sim-time bin (mean / max of {len(act)} bins) | "
                     f"{100 * act['active_share'].mean():.1f}% / "
                     f"{100 * act['active_share'].max():.1f}% |")
    modeled = summary.get("modeled") or {}
    if modeled:
        lines.append(f"| modeled makespan / compute / stall ({modeled.get('model_profile')} on "
                     f"{modeled.get('hardware')}; modeled) | "
                     f"{modeled.get('modeled_makespan_s', float('nan')):.2f} / "
                     f"{modeled.get('modeled_compute_s', float('nan')):.2f} / "
                     f"{modeled.get('modeled_stall_s', float('nan')):.2f} s |")
    if len(lat):
        q = lat.quantile([0.5, 0.9, 0.99])
        what = ("wall latency of this process (a modeled run: not the model's time, see the "
                "modeled makespan)" if modeled else "latency")
        lines.append(f"| {what} p50 / p90 / p99 | {q[0.5]:.3f} / {q[0.9]:.3f} / "
                     f"{q[0.99]:.3f} s |")
    lines += [f"| output tokens / s | {summary.get('output_tokens_per_s', 0)} |",
              f"| prompt tokens (cached) | {summary.get('prompt_tokens', 0)} "
              f"({summary.get('cached_tokens', 0)}) |"]
    if has_memory_data(trace):
        rates = summary.get("hit_rate") or {}
        lines.append("| device hit rate | " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in rates.items() if v is not None) + " |")
    else:
        lines.append("| device hit rate | no memory data |")
    moved = bytes_moved(result.memory)
    lines.append("| bytes moved | " + (", ".join(
        f"{r.kind} {r.op} {_fmt_bytes(r.bytes)}" for r in moved.itertuples())
        or "no memory operations recorded") + " |")
    occupancy = summary.get("occupancy") or {}
    if occupancy.get("steps"):
        lines.append(f"| engine occupancy: sequences / tokens per step | "
                     f"{occupancy['sequences_per_step']} / {occupancy['tokens_per_step']} |")
        lines.append(f"| calls in flight (mean over sim time) | "
                     f"{occupancy['mean_calls_in_flight']} |")
    distance = summary.get("distance") or {}
    if distance.get("kendall_tau") is not None:
        lines.append(f"| distance prediction: Kendall tau (snapshots) | "
                     f"{distance['kendall_tau']} ({distance.get('snapshots', '?')}"
                     f"{few_snapshots(distance)}) |")
    world = summary.get("world") or {}
    if world:
        lines += ["", "## World metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in world.items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{stem}]({stem}.png)" for stem in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNGs and report.md of ``run_dir`` into ``out`` (default: ``run_dir``)."""
    result = load_trace(run_dir)
    out_dir = Path(out) if out is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = result.trace
    figures = {
        "calls_over_time": plot_calls_over_time(trace, agent_count(trace, result.summary)),
        "activation": plot_activation(trace),
        "latency_cdf": plot_latency_cdf(trace),
        "hit_rate": plot_hit_rate(trace),
        "bytes_by_kind": plot_bytes_by_kind(result.memory),
    }
    for stem, fig in figures.items():
        # Drawn without an ax, each is a top-level Figure, which is its own ``.figure``.
        fig.figure.savefig(out_dir / f"{stem}.png", dpi=110)
    report = out_dir / "report.md"
    report.write_text(markdown(result, list(figures)))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalesim.report",
        description="Plots and a markdown summary (report.md) of a ScaleSim run directory.")
    parser.add_argument("run_dir", help="a run directory (trace.parquet, memory.parquet, "
                                        "summary.json)")
    parser.add_argument("--out", help="where to write (default: the run directory)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir, args.out)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {first}", file=sys.stderr)
        return 2
    print(f"wrote {report} and {len(PLOTS)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
