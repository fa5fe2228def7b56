"""Two engine replicas of the real model give every call the greedy reply one engine gives."""

from __future__ import annotations

import pytest

import scalesim

pytestmark = [pytest.mark.model, pytest.mark.slow]

TINY = {"world__params__villagers": 2, "world__params__max_tokens": 4,
        "world__params__reflect_every": 0, "sim__until": 800}
COLUMNS = ["agent", "sim_time", "prompt", "completion", "prompt_tokens", "output_tokens"]


def calls(result: scalesim.RunResult):
    """Each agent's calls in its own order (the run-wide request ids may interleave otherwise)."""
    trace = result.trace.sort_values(["agent", "sim_time", "request_id"])
    return trace[COLUMNS].reset_index(drop=True)


@pytest.fixture(scope="module")
def one_engine(tmp_path_factory, smol_engine):
    return scalesim.simulate("worlds/town.yaml", out=tmp_path_factory.mktemp("one"),
                             engine=smol_engine, **TINY)


def test_two_local_replicas_match_one_engine(one_engine, tmp_path):
    two = scalesim.simulate("worlds/town.yaml", out=tmp_path, runtime__replicas=2, **TINY)
    assert two.trace["error"].isna().all() and len(two.trace) >= 4
    assert calls(two).equals(calls(one_engine))
    rows = two.summary["replicas"]["per_replica"]
    assert all(r["calls"] > 0 for r in rows)  # the two villagers live on different replicas


@pytest.mark.slow
def test_two_ray_replicas_match_one_engine(one_engine, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = scalesim.simulate("worlds/town.yaml", out=tmp_path, runtime__replicas=2,
                                runtime__cluster="ray", **TINY)
    finally:
        ray.shutdown()
    assert two.summary["replicas"]["cluster"] == "ray"
    assert calls(two).equals(calls(one_engine))


def test_two_torch_replicas_match_one_torch_engine(tmp_path):
    torch_tiny = {**TINY, "runtime__executor": "torch"}
    one = scalesim.simulate("worlds/town.yaml", out=tmp_path / "one", **torch_tiny)
    two = scalesim.simulate("worlds/town.yaml", out=tmp_path / "two", runtime__replicas=2,
                            **torch_tiny)
    assert two.trace["error"].isna().all()
    assert calls(two).equals(calls(one))
    assert two.summary["cached_tokens"] > 0  # each replica's prefix cache serves its agents
