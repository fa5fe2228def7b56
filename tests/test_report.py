"""scalesim.report: plots and report.md from a run directory; empty memory data; bad input."""

import json

import pandas as pd
import pytest
from fake_engine import FakeEngine

import scalesim
from scalesim import report

CONFIG = {"world": {"class": "worlds.social_feed:SocialFeed", "params": {"users": 20}},
          "sim": {"until": 1440}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    scalesim.simulate(CONFIG, out=out, engine=FakeEngine(["post", "Nice one.", "reply"]))
    return out


def test_report_writes_plots_and_markdown(run_dir, tmp_path):
    written = report.write_report(run_dir, tmp_path)
    for stem in report.PLOTS:
        png = tmp_path / f"{stem}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    text = written.read_text()
    assert "no memory data" in text and "no memory operations recorded" in text
    assert "| agents / agents that called | 20 /" in text
    assert "| parse_fallbacks |" in text                 # the world's metrics are included
    assert "![latency_cdf](latency_cdf.png)" in text
    assert "| engine occupancy: sequences / tokens per step |" in text


def test_activity_share_counts_distinct_agents_per_bin():
    trace = pd.DataFrame({"agent": ["a", "a", "b", "c"], "sim_time": [0.0, 1.0, 1.0, 9.0],
                          "error": [None] * 4})
    act = report.activity(trace, agents=4, bins=2)
    assert act["calls"].tolist() == [3, 1]
    assert act["active_share"].tolist() == [0.5, 0.25]


def test_hit_rates_per_kind_and_memory_detection(run_dir):
    trace = scalesim.load_trace(run_dir).trace.copy()
    assert not report.has_memory_data(trace)
    trace["hits_adapter"] = 1
    trace["misses_adapter"] = [i % 2 for i in range(len(trace))]
    assert report.has_memory_data(trace)
    rates = report.hit_rates(trace, bins=1)
    assert rates["adapter"].iloc[0] == pytest.approx(len(trace) / (len(trace) + len(trace) // 2))
    assert rates["model"].isna().all()
    report.plot_hit_rate(trace)                            # draws lines, not the empty note


def test_bytes_moved_sums_by_kind_and_op():
    memory = pd.DataFrame({"kind": ["adapter", "adapter", "prefix_kv"], "op": ["load"] * 3,
                           "bytes": [10, 5, 7]})
    moved = report.bytes_moved(memory)
    assert moved.values.tolist() == [["adapter", "load", 15], ["prefix_kv", "load", 7]]
    assert report.bytes_moved(memory.iloc[:0]).empty


def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "not a run directory" in err


def test_a_modeled_run_labels_its_times_and_a_thin_tau(tmp_path):
    config = {"world": {"class": "tests.tiny_world:Pingers", "params": {"agents": 2}},
              "runtime": {"executor": "modeled", "model": "smollm2-135m"}, "sim": {"until": 5}}
    scalesim.simulate(config, out=tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert "| modeled makespan / compute / stall (smollm2-135m on H100; modeled) |" in text
    assert "| wall latency of this process (a modeled run" in text
    summary_file = tmp_path / "summary.json"
    summary = json.loads(summary_file.read_text())
    for snapshots, warned in ((3, True), (40, False)):
        summary["distance"] = {"kendall_tau": 0.5, "snapshots": snapshots}
        summary_file.write_text(json.dumps(summary))
        text = report.write_report(tmp_path).read_text()
        assert ("0.5 (3; fewer than 20: not a reliable estimate)" in text) == warned
        assert "0.5 (40)" in text or warned
