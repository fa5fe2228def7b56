"""Werewolf tables on the fake engine: speaking order, simultaneous votes, eliminations."""

from fake_engine import run_world

from worlds.round_table import RoundTable


def accuse(nick):
    return lambda r: nick if "Who is the werewolf:" in r.prompt else f"I think {nick} lies."


def test_players_speak_in_order_then_all_vote_at_once():
    world, engine = run_world(RoundTable, {"tables": 2, "players": 4, "rounds": 1}, None,
                              reply=accuse("Bo"))
    speak = [(t, r.agent_id) for t, r in zip(engine.times, engine.requests)
             if "Say one short sentence" in r.prompt]
    # One speaker per table per minute, in seat order; tables in parallel.
    assert [a for t, a in speak if a.startswith("t0.")] == ["t0.Ann", "t0.Bo", "t0.Cy", "t0.Dee"]
    assert [t for t, a in speak if a.startswith("t1.")] == [0, 1, 2, 3]
    votes = [t for t, r in zip(engine.times, engine.requests) if "Who is the werewolf:" in r.prompt]
    assert len(votes) == 8 and set(votes) == {4}
    # Bo cannot vote for himself (his reply names no candidate: a fallback), so Bo goes.
    assert all(t.eliminated == ["Bo"] for t in world.tables)
    assert world.counters()["parse_fallbacks"] == 2


def test_the_game_ends_when_the_wolf_is_out_or_two_are_left():
    world, _ = run_world(RoundTable, {"tables": 3, "players": 5, "rounds": 5}, None,
                         reply=accuse("Ann"))
    for table in world.tables:
        assert table.turns.closed
        if table.outcome == "villagers":
            assert table.eliminated[-1] == table.wolf
        else:
            assert table.outcome == "wolf" and len(table.seated) == 2
    m = world.metrics()
    assert m["villager_wins"] + m["wolf_wins"] == 3 and m["undecided"] == 0


def test_upcoming_order_is_exposed_while_a_table_speaks():
    world, _ = run_world(RoundTable, {"tables": 1, "players": 4, "rounds": 1}, 1.5,
                         reply=accuse("Cy"))
    assert world.tables[0].turns.upcoming() == ["t0.Bo", "t0.Cy", "t0.Dee", "t0.Ann"]
