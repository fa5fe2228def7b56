"""Quick modes of the modeled experiments run end to end and print their JSON headline."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.modeled_sim import NoisyDistance, run_world


class _Fixed:
    """Estimated call times at sim time 0, watchable like the oracle."""

    def __init__(self, d):
        self.d = d
        self.env = type("Env", (), {"now": 0.0})()
        self.watchers = []

    def distance(self, agent):
        return max(0.0, self.d[agent] - self.env.now)

    def order_key(self, agent):
        return self.d[agent]

    def watch(self, callback):
        self.watchers.append(callback)

    def set(self, agent, eta):
        self.d[agent] = eta
        for callback in self.watchers:
            callback(agent)

    def nearest(self, k):
        return sorted(self.d, key=self.d.get)[:k]


def test_noise_leaves_pending_calls_and_zero_noise_alone():
    src = _Fixed({"a": 0.0, "b": 5.0, "c": 9.0})
    assert [NoisyDistance(src, 0.0).distance(a) for a in "abc"] == [0.0, 5.0, 9.0]
    noisy = NoisyDistance(src, 1.0, seed=1)
    assert noisy.distance("a") == 0.0
    first = noisy.distance("b")
    assert first == noisy.distance("b")  # consistent until the estimate changes
    src.env.now = 2.0
    assert noisy.distance("b") == max(0.0, first - 2.0)  # a fixed estimate: time runs down
    changed = []
    noisy.watch(changed.append)
    src.set("b", 50.0)
    assert changed == ["b"] and noisy.distance("b") != max(0.0, first - 2.0)


def test_run_world_small_social_feed_is_modeled_and_deterministic():
    a = run_world("social_feed", 40, "scalesim", budget_fraction=0.25, until=300)
    b = run_world("social_feed", 40, "scalesim", budget_fraction=0.25, until=300)
    assert a["modeled"] and a["calls"] > 0
    assert a["modeled_makespan_s"] == b["modeled_makespan_s"] and a["order"] == b["order"]
    belady = run_world("social_feed", 40, "belady", budget_fraction=0.25, until=300,
                       order=a["order"])
    assert belady["calls"] == a["calls"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_setting", "noise"])
def test_quick_mode_prints_a_json_headline(name, tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--quick"], env=env,
                         capture_output=True, text=True, timeout=180, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["experiment"] == name and line["modeled"] is True
    quick = tmp_path / "quick"  # a quick run never overwrites the full results
    assert (quick / f"{name}.csv").is_file() and (quick / f"{name}.png").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_bench_policies_runs_every_policy_on_the_real_engine():
    script = Path(__file__).resolve().parent.parent / "experiments" / "bench_policies.py"
    cmd = [sys.executable, str(script), "--agents", "4", "--budget", "0.5",
           "--until", "560", "--max-tokens", "2", "--persona-tokens", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    results = line["results"]
    assert line["world"] == "town" and set(results) == {"lru", "scalesim", "belady", "infinite"}
    assert line["speedup_vs_lru"] > 0 and line["slowdown_vs_infinite"] > 0
    # Greedy replies: memory management must not change what the villagers do.
    assert len({r["calls"] for r in results.values()}) == 1 and results["lru"]["calls"] >= 3
    # Three villagers call with room for two: lru must evict; infinite never does.
    assert results["lru"]["evictions"] > 0 and results["infinite"]["evictions"] == 0


@pytest.mark.slow
@pytest.mark.model
def test_validate_modeled_replays_the_real_run_exactly(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.validate_modeled", "--quick"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    # The replay must make the same calls with the same tokens; the ratio is what it is.
    assert line["replay_identical"] is True and line["modeled_over_measured"]["town"] > 0
    assert (tmp_path / "quick" / "validate_modeled.csv").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_bench_memory_wall_quick_runs_every_policy_over_the_disk_tier():
    cmd = [sys.executable, "experiments/bench_memory_wall.py", "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    headline = json.loads(out.strip().splitlines()[-1])
    runs = headline["results"]
    assert set(runs) == {"build", "build again", "lru", "scalesim", "belady", "infinite",
                         "recompute"}
    # The store is written by the first build and read by every later run; recompute reads none.
    assert runs["build"]["disk_written_mb"] > 0 and runs["build again"]["persona_build_s"] < \
        runs["build"]["persona_build_s"]
    assert runs["lru"]["disk_read_mb"] > 0 and runs["infinite"]["hit_rate"] == 1.0
    assert runs["recompute"]["persona_tokens"] > 0
    assert headline["same_call_same_output"] is True


@pytest.mark.slow
def test_prediction_suite_quick_runs_every_policy_and_infinite_is_the_bound(tmp_path):
    env = {**os.environ, "SCALESIM_RESULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "experiments.prediction_suite", "--quick",
                          "--worlds", "town,outbreak"], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["modeled"] is True and line["worlds"] == ["town", "outbreak"]
    assert line["infinite_is_a_bound"] is True
    assert line["min_speedup_vs_lru"] > 0 and set(line["tau"]) == {"town", "outbreak"}
    assert (tmp_path / "quick" / "prediction_suite.csv").is_file()
    assert (tmp_path / "quick" / "prediction_suite.png").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_bench_peers_quick_runs_the_scalesim_side(tmp_path):
    env = {**os.environ, "SCALESIM_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "experiments.bench_peers", "--quick", "--no-llama"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         check=True).stdout
    headline = json.loads(out.strip().splitlines()[-1])
    assert headline["experiment"] == "bench_peers" and headline["quantization"] == "int4x8"
    assert headline["scalesim_calls_per_s_1"] > 0 and headline["scalesim_calls_per_s_2"] > 0
    assert headline["scalesim_decode_tok_s"] > 0 and headline["step2_gflops"] > 0
    assert "vs_llamacpp_1" not in headline  # no llama-server was asked for
    assert (tmp_path / "quick" / "bench_peers.json").is_file()


def test_bench_prefix_quick_bounds_every_budgeted_variant(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.bench_prefix", "--quick",
                          "--settings", "sparse rounds", "--tiers", "dropped"],
                         env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    setting = line["modeled"]["sparse rounds, evicted dropped"]
    assert setting["unbounded_computed_over_ideal"] == 1.0
    # The unbounded cache bounds every budgeted variant, belady's exact future included.
    assert setting["unbounded_vs_lru"] >= max(setting["belady_vs_lru"], 1.0)
    rows = json.loads((tmp_path / "quick" / "bench_prefix_selected_rows.json").read_text())
    variants = rows["sparse rounds, evicted dropped"]
    assert {"tokens + belady", "tokens + lru", "unbounded"} <= set(variants)
    # belady replays lru's call order: the same calls, so the same prompt tokens.
    assert variants["tokens + belady"]["calls"] == variants["tokens + lru"]["calls"]
    assert variants["tokens + belady"]["prompt_tokens"] == variants["tokens + lru"]["prompt_tokens"]


def test_bench_prefix_stream_quick_replays_every_stream_through_the_server(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.bench_prefix_stream", "--quick"],
                         env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["experiment"] == "bench_prefix_stream" and line["engine"] == "modeled"
    streams = line["streams"]
    assert set(streams) == {"oasis", "agentscope", "concordia", "salon"}
    for name, result in streams.items():
        share = result["reused_share"]
        assert share["no reuse"] == 0.0, name
        # Unbounded, the token-level cache reuses at least what persona-only reuse does; under a
        # quarter budget it may reuse less (cyclic speakers: see experiments/README.md).
        assert share["unbounded"] >= max(share["tokens + lru"], share["persona only"]), name
        assert share["unbounded"] > 0.5, name
    # The streams are recorded, replayable files.
    recorded = tmp_path / "quick" / "streams"
    assert {p.stem for p in recorded.glob("*.jsonl")} == set(streams)


@pytest.mark.slow
def test_sweep_duration_quick_runs_every_world_policy_and_duration(tmp_path):
    env = {**os.environ, "SCALESIM_RESULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "experiments.sweep_duration", "--quick"],
                         env=env, capture_output=True, text=True, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["experiment"] == "sweep_duration" and line["modeled"] is True
    import pandas as pd

    rows = pd.read_csv(tmp_path / "quick" / "sweep_duration.csv")
    assert set(rows["policy"]) == {"lru", "scalesim", "belady", "infinite"}
    assert rows.groupby("world")["duration"].nunique().min() == 2
    zero = rows[rows["duration"] == 0]
    assert (zero["mean_calls_in_flight"] == 0).all()
    assert (rows[rows["duration"] > 0]["mean_calls_in_flight"] > 0).all()
    assert set(line["max_occupancy"]) == set(rows["world"])
    assert (tmp_path / "quick" / "sweep_duration.png").is_file()


def test_time_split_charges_samples_to_the_component_whose_code_runs():
    from experiments.time_split import TimeSplit, component
    from runtime.memory.lazy_heap import LazyHeap

    assert component("/x/scalesim/distance.py") == "oracle"
    assert component("/x/site-packages/simpy/core.py") == "DES"
    assert component("/usr/lib/python3.11/heapq.py") is None
    heap: LazyHeap[int] = LazyHeap()
    popped = pushed = 0
    with TimeSplit(interval=0.002) as split:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            for k in range(200):
                heap.push((k, heap.versions.stamp(k), k))
                pushed += 1
            while heap.pop() is not None:
                popped += 1
    assert popped == pushed > 0
    shares = split.shares()
    assert split.summary()["samples"] > 20
    assert max(shares, key=shares.__getitem__) == "memory manager", shares


def test_scale_prints_rate_memory_and_the_time_split(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.scale", "--calls", "1500",
                          "--agents", "600"], env=env, capture_output=True, text=True,
                         timeout=180, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["experiment"] == "scale" and line["calls"] == 1500 and line["agents"] == 600
    assert line["peak_rss_gib"] > 0 and line["bytes_per_agent"] >= 0  # small worlds reuse freed pages
    assert abs(sum(line["split"].values()) - 1.0) < 0.01 and "oracle" in line["split"]


def test_bench_stream_estimator_quick_scores_the_estimator_against_the_oracle(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.bench_stream_estimator", "--quick",
                          "--worlds", "round_table,market", "--no-server"], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["experiment"] == "bench_stream_estimator" and line["modeled"] is True
    assert set(line["worlds"]) == {"round_table", "market"}
    for name, world in line["worlds"].items():
        assert set(world["modeled_makespan_s"]) == {
            "lru", "scalesim (oracle)", "scalesim (recency only)", "scalesim (estimator)",
            "belady"}, name
        assert world["kendall_tau"]["snapshots"] > 0 and world["kendall_tau"]["oracle"] > 0
        assert -1 <= world["kendall_tau"]["estimator"] <= 1
    # The recorded streams the estimator was replayed from.
    assert {p.stem for p in (tmp_path / "quick" / "streams").glob("*.jsonl")} == \
        {"round_table", "market"}
    assert (tmp_path / "quick" / "bench_stream_estimator.json").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_bench_prefill_fairness_quick_measures_every_cap(tmp_path):
    env = dict(os.environ, SCALESIM_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "experiments.bench_prefill_fairness", "--quick",
                          "--caps", "0,32"], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["experiment"] == "bench_prefill_fairness" and line["modeled"] is False
    assert line["long_prompt_tokens"] > 500 and line["short_speedup_0"] == 1.0
    assert line["short_s_32"] > 0 and line["long_s_32"] > 0
    assert (tmp_path / "quick" / "bench_prefill_fairness.json").is_file()
