"""Each example world runs end to end on the real SmolLM2-135M with a tiny configuration."""

import pytest

import scalesim

pytestmark = [pytest.mark.model, pytest.mark.slow]

TINY = {
    "town": {"world__params__villagers": 2, "world__params__max_tokens": 4, "sim__until": 700},
    "social_feed": {"world__params__users": 4, "world__params__attach": 1,
                    "world__params__max_tokens": 4, "sim__until": 600},
    "round_table": {"world__params__tables": 1, "world__params__players": 3,
                    "world__params__rounds": 1, "world__params__max_tokens": 4},
    "traffic": {"world__params__size": 2, "world__params__vehicles": 2,
                "world__params__trips": 1},
    "outbreak": {"world__params__people": 10, "world__params__contacts": 4,
                 "world__params__max_tokens": 4, "sim__until": 1440},
    "market": {"world__params__traders": 2, "world__params__groups": 1,
               "world__params__max_tokens": 4, "sim__until": 61},
    "supply_chain": {"world__params__shops": 2, "world__params__customers_per_shop": 2,
                     "world__params__buy_every_hours": 3, "sim__until": 60},
}


@pytest.mark.parametrize("world", sorted(TINY))
def test_world_runs_on_the_real_model(world, tmp_path, smol_engine):
    result = scalesim.simulate(f"worlds/{world}.yaml", out=tmp_path, engine=smol_engine,
                          **TINY[world])
    assert result.summary["status"] == "completed"
    assert result.summary["calls"] > 0 and result.summary["failed_calls"] == 0
    metrics = result.summary["world"]
    assert metrics["failed_agents"] == 0
    assert 0 <= metrics["parse_fallbacks"] <= result.summary["calls"]
    # Free text is capped at max_tokens (4 here); one-word choices get LLMAgent's 8 tokens.
    assert (result.trace["output_tokens"] <= 8).all()
