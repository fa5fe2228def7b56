"""Gridlock on the fake engine: decisions at intersections, travel times, fallbacks, autopilot."""

from fake_engine import run_world

from worlds.traffic import Traffic, blocks


def test_blocks_describes_the_offset():
    assert blocks((0, 0), (1, 2)) == "2 blocks north and 1 block east"
    assert blocks((2, 2), (2, 1)) == "1 block south"


def test_cars_finish_their_trips_with_llm_turns():
    world, engine = run_world(Traffic, {"size": 4, "vehicles": 3, "trips": 2}, None,
                              reply=["North.", "east", "I don't know"])
    m = world.metrics()
    assert m["trips"] == 6 and m["decisions"] == len(engine.requests)
    assert world.counters()["parse_fallbacks"] > 0
    # Every decision offers only roads that exist (a corner has two).
    for r in engine.requests:
        listed = r.prompt.split("Do you turn ")[1].split("?")[0].replace(" or ", ", ")
        assert 2 <= len(listed.split(", ")) <= 4
    # Sim time passes only by driving.
    assert world.now > 0 and all(t > 0 for c in world.agents.values() for t in c.trip_minutes)


def test_patience_hands_over_to_the_shortest_path():
    world, engine = run_world(Traffic, {"size": 5, "vehicles": 2, "trips": 1, "patience": 0},
                              None)
    m = world.metrics()
    assert len(engine.requests) == 0 and m["trips"] == 2 and m["detours"] == 0
    assert m["autopilot_moves"] > 0


def test_congestion_slows_a_shared_road():
    world, _ = run_world(Traffic, {"size": 2, "vehicles": 1, "congestion": 1.0}, 1e-9)
    road = next(iter(world.roads.edges.values()))
    road["vehicles"] = 1
    alone = world.travel_minutes(road)
    road["vehicles"] = 3
    assert world.travel_minutes(road) == 3 * alone
