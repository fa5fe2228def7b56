"""What a world author gets from the library: agents that never call the LLM, counters summed
for them, ``TurnOrder`` from the package."""

from __future__ import annotations

import pytest

import scalesim
from scalesim import Agent, TurnOrder, World

DELIVERIES = {"world": {"class": "tests.tiny_world:Deliveries", "params": {"trips": 3}},
              "runtime": {"executor": "modeled", "model": "smollm2-135m",
                          "modeled": {"lora_rank": 8, "managed": ["adapter", "prefix_kv"]},
                          "memory": {"device_bytes": 12_000_000}},
              "sim": {"until": 20}}


def test_an_agent_that_never_calls_the_llm_holds_no_memory(tmp_path):
    result = scalesim.simulate(DELIVERIES, out=tmp_path)
    assert sorted(result.trace.agent.unique()) == ["r0", "r1"] and len(result.trace) == 6
    objects = set(result.memory.object)
    assert objects and not any("courier" in name for name in objects)
    assert result.summary["world"]["trips"] == 3  # the courier's counter, summed for the world


def test_an_agent_that_never_calls_the_llm_is_stopped_if_it_does(tmp_path):
    class Liar(Agent):
        calls_llm = False

        def run(self):
            yield self.llm("hello")

    class Lies(World):
        def setup(self) -> None:
            self.add(Liar("liar"))

    import tests.tiny_world as module

    module.Lies = Lies  # type: ignore[attr-defined]
    config = {"world": {"class": "tests.tiny_world:Lies"},
              "runtime": {"executor": "modeled", "model": "smollm2-135m"}, "sim": {"until": 5}}
    with pytest.raises(scalesim.RunFailed, match="calls_llm is False"):
        scalesim.simulate(config, out=tmp_path)


def test_library_counters_reach_the_summary_without_the_worlds_metrics(tmp_path):
    config = {"world": {"class": "worlds.traffic:Traffic", "params": {"vehicles": 3}},
              "runtime": {"executor": "modeled", "model": "smollm2-135m"}, "sim": {"until": 60}}
    result = scalesim.simulate(config, out=tmp_path)
    world = result.summary["world"]
    assert "parse_fallbacks" in world and world["parse_fallbacks"] >= 0
    assert "reflections" in world


def test_turn_order_is_exported():
    assert TurnOrder is scalesim.turns.TurnOrder
