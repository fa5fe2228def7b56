"""Maple Hollow on the fake engine: schedules, travel, conversations, reflections."""

from fake_engine import run_world

from worlds.town import Town


def test_town_day_follows_schedules_and_talks():
    world, engine = run_world(Town, {"villagers": 4, "reflect_every": 2}, 1320,
                              reply=lambda r: "I wave hello.")
    m = world.metrics()
    assert m["failed_agents"] == 0 and world.counters()["parse_fallbacks"] == 0
    assert m["conversations"] > 0 and m["interactions"] > 0 and world.counters()["reflections"] > 0
    # Everyone reached the last stop of the day, the tavern or the park.
    assert all(v.place in ("tavern", "park") for v in world.agents.values())
    arrivals = [r for r in engine.requests if "You have just arrived" in r.prompt]
    assert len(arrivals) == 4 * 4
    # Walking takes time: Ada leaves home at 06:00 and reaches the bakery five minutes later.
    assert "It is 06:05. You have just arrived at the bakery" in arrivals[0].prompt
    assert world.agent("Ada Brook").memory.retrieve(world.now, k=1)


def test_town_answers_are_recorded_as_conversation_lines():
    world, engine = run_world(Town, {"villagers": 2}, 1320, reply=lambda r: "")
    # Empty replies fall back to "..." and are counted; the day still completes.
    assert world.counters()["parse_fallbacks"] == len(engine.requests) > 0
    assert world.now == 1320


def test_generated_villagers_have_unique_names():
    world, _ = run_world(Town, {"villagers": 600}, 1)
    assert len(world.agents) == 600


def test_town_hints_whom_a_newcomer_will_invite_and_is_never_wrong():
    from fake_engine import FakeEngine

    from scalesim import SimEnvironment
    from scalesim.distance import DistanceOracle

    engine = FakeEngine(lambda r: "I wave hello.")
    env = SimEnvironment(engine, observer=DistanceOracle)
    engine.env = env
    oracle = env.observer
    hints: list[tuple[str, float]] = []
    calls: set[tuple[str, float]] = set()
    original = oracle.hint
    oracle.hint = lambda agent, eta: (hints.append((agent, eta)), original(agent, eta))
    env.submit_listeners.append(lambda agent: calls.add((agent, env.now)))
    world = Town(env)
    world.setup(villagers=12)
    env.run(until=1320)
    # Invited while idling, a villager speaks when the newcomer arrives, not at its next stop.
    assert len(hints) > 5
    assert all(hint in calls for hint in hints)
