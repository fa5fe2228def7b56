"""A tiny town on the real model: files, shapes, and determinism under a fixed seed."""

from __future__ import annotations

import pytest

import scalesim

pytestmark = [pytest.mark.model, pytest.mark.slow]

TINY = {"world__params__villagers": 2, "world__params__max_tokens": 4,
        "world__params__reflect_every": 0, "sim__until": 800}


def test_tiny_town_runs_and_is_deterministic(tmp_path, smol_engine):
    first = scalesim.simulate("worlds/town.yaml", out=tmp_path / "a", engine=smol_engine, **TINY)
    second = scalesim.simulate("worlds/town.yaml", out=tmp_path / "b", engine=smol_engine, **TINY)
    trace = first.trace
    assert len(trace) >= 4 and set(trace["agent"]) == {"Ada Brook", "Ben Carter"}
    assert (trace["output_tokens"] <= 4).all() and trace["error"].isna().all()
    assert first.summary["status"] == "completed" and first.summary["sim_time"] == 800
    columns = ["agent", "sim_time", "prompt", "completion", "prompt_tokens", "output_tokens"]
    assert trace[columns].equals(second.trace[columns])
    assert scalesim.load_trace(tmp_path / "a").trace[columns].equals(trace[columns])
