"""World YAMLs run on the modeled backend (``runtime.executor: modeled``) end to end."""

import json

import pytest

from scalesim.config import ConfigError, load_config
from scalesim import simulate as run

TINY = """
world:
  class: tests.tiny_world:Pingers
  params: {agents: 6, rounds: 3}
runtime:
  executor: modeled
  model: qwen2.5-7b
  modeled: {hardware: L4, lora_rank: 8, output_tokens: 3, prefix_tokens: 40}
  memory: {policy: lru, device_bytes: 120000000}
sim: {until: 10}
"""


def test_a_tiny_world_runs_on_the_modeled_executor(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    result = run(path, out=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["modeled"]["modeled"] is True and summary["modeled"]["hardware"] == "L4"
    assert summary["modeled"]["modeled_makespan_s"] > 0
    assert summary["memory"]["policy"] == "lru"
    trace = result.trace
    assert len(trace) == 18 and trace["output_tokens"].eq(3).all()
    # 6 agents x ~39 MB (rank-8 adapter + prefix KV) in a 120 MB budget: the manager built
    # from runtime.memory evicts, and its stalls are modeled link time.
    assert summary["memory"]["evictions"] > 0 and summary["modeled"]["modeled_stall_s"] > 0
    assert summary["memory"]["stall_s"] == pytest.approx(summary["modeled"]["modeled_stall_s"],
                                                         abs=1e-3)
    # Each call's prefix KV is either a hit or a miss, and the trace agrees with the manager.
    per_call = trace["hits_prefix_kv"] + trace["misses_prefix_kv"]
    assert per_call.eq(1).all()
    hits = int(trace["hits_prefix_kv"].sum() + trace["hits_adapter"].sum())
    misses = int(trace["misses_prefix_kv"].sum() + trace["misses_adapter"].sum())
    assert summary["memory"]["hit_rate"] == pytest.approx(hits / (hits + misses), abs=1e-4)


def test_a_large_world_yaml_runs_modeled_with_overrides(tmp_path):
    result = run("worlds/social_feed_large.yaml", out=tmp_path / "run",
                 runtime__executor="modeled", runtime__model="qwen2.5-7b",
                 world__params__users=300, sim__until=120,
                 runtime__memory__device_bytes=2_000_000_000)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(result.trace) > 0
    assert summary["modeled"]["hits"] + summary["modeled"]["misses"] > 0


def test_modeled_config_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.replace("hardware: L4", "hardware: TPU9"))
    with pytest.raises(ConfigError, match=r"runtime.modeled.hardware: .*TPU9"):
        load_config(path)
    path.write_text(TINY.replace("qwen2.5-7b", "gpt-5"))
    with pytest.raises(ConfigError, match=r"runtime.model: the modeled executor needs a model profile"):
        run(path, out=tmp_path / "run")


def test_infinite_is_a_true_bound_and_unlimited_keeps_the_cold_misses(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    makespan, summaries = {}, {}
    for policy in ("infinite", "unlimited", "lru", "scalesim"):
        run(path, out=tmp_path / policy, runtime__memory__policy=policy)
        summary = json.loads((tmp_path / policy / "summary.json").read_text())
        makespan[policy] = summary["modeled"]["modeled_makespan_s"]
        summaries[policy] = summary
    # infinite: every object resident from the start, so no miss, no stall, no prefill of a
    # persona; unlimited (the old "infinite") loads each object on its first use.
    assert summaries["infinite"]["modeled"]["misses"] == 0
    assert summaries["infinite"]["modeled"]["modeled_stall_s"] == 0
    assert summaries["unlimited"]["modeled"]["misses"] == 12  # 6 agents x (adapter, prefix)
    assert summaries["unlimited"]["memory"]["evictions"] == 0
    assert min(makespan.values()) == makespan["infinite"] < makespan["unlimited"]


def test_the_modeled_disk_tier_costs_disk_reads_and_writes_nothing(tmp_path):
    """No host tier: without a disk tier an evicted prefix is recomputed; with one it is read
    back at the profile's disk speed, and the modeled disk leaves no file behind."""
    path = tmp_path / "tiny.yaml"
    # 2,000-token personas: ~115 MB of KV each, a prefill that costs more than reading it back.
    path.write_text(TINY.replace("device_bytes: 120000000",
                                 "device_bytes: 400000000, host_bytes: 0")
                    .replace("prefix_tokens: 40}", "prefix_tokens: 2000}"))
    disk = tmp_path / "disk-tier"
    runs = {}
    for name, extra in (("recompute", {}), ("disk", {"runtime__memory__disk_dir": str(disk)}),
                        ("store", {"runtime__memory__kv_store": str(tmp_path / "kv-store")})):
        result = run(path, out=tmp_path / name.replace(" ", "-"), **extra)
        runs[name] = (result, result.summary)
    _, plain = runs["recompute"]
    result, with_disk = runs["disk"]
    rows = result.memory
    assert "disk" not in plain["memory"]["tiers"]
    assert with_disk["memory"]["tiers"]["disk"]["read_bytes"] > 0
    assert ((rows.op == "load") & (rows.tier_from == "disk")).any()
    assert with_disk["modeled"]["modeled_makespan_s"] < plain["modeled"]["modeled_makespan_s"]
    _, store = runs["store"]  # the store is the disk tier of personas: modeled the same way
    assert store["modeled"]["modeled_makespan_s"] == with_disk["modeled"]["modeled_makespan_s"]
    assert not disk.exists() and not (tmp_path / "kv-store").exists()


def test_a_slower_modeled_disk_costs_more():
    from runtime.cost_model import CostModel, hardware
    from runtime.model.profiles import profile

    fast = CostModel(hardware("L4"), profile("qwen2.5-7b"))
    slow = CostModel(hardware("L4", disk_bw=1e9, disk_latency=1e-3), profile("qwen2.5-7b"))
    n = 50_000_000
    assert fast.copy_seconds(n, "host") == slow.copy_seconds(n, "host")
    assert slow.copy_seconds(n, "disk") - fast.copy_seconds(n, "disk") == pytest.approx(
        1e-3 - 100e-6 + n / 1e9 - n / 7e9)


def test_modeled_replies_chosen_by_prompt_pattern(tmp_path):
    """A mapping of regular expressions to answers: each call gets answers for its question."""
    config = {"world": {"class": "tests.tiny_world:Pingers", "params": {"agents": 2, "rounds": 4,
                                                                       "reword_from": 2}},
              "runtime": {"executor": "modeled", "model": "smollm2-135m",
                          "modeled": {"replies": {r"reworded$": ["yes", "no"],
                                                  r"round [01]": ["first"], "": ["other"]}}},
              "sim": {"until": 10}}
    trace = run(config, out=tmp_path).trace
    reworded = trace[trace.prompt.str.endswith("reworded")]
    assert set(reworded.completion) == {"yes", "no"}
    assert set(trace[~trace.prompt.str.endswith("reworded")].completion) == {"first"}


@pytest.mark.parametrize("replies, message", [({"(": ["x"]}, "not a regular expression"),
                                              ({"a": []}, "are empty")])
def test_bad_reply_patterns_name_the_key(tmp_path, replies, message):
    config = {"world": {"class": "tests.tiny_world:Pingers"},
              "runtime": {"executor": "modeled", "modeled": {"replies": replies}}}
    with pytest.raises(ConfigError, match=f"runtime.modeled.replies.*{message}"):
        run(config, out=tmp_path)
