"""TurnOrder: members speak in order, rounds end and pause, removal and closing wake the right ones."""

import pytest
from fake_engine import FakeEngine

from scalesim import SimEnvironment
from scalesim.turns import TurnOrder


def speaker_process(env, order, name, log, rounds, talk=1.0):
    for _ in range(rounds):
        ok = yield order.my_turn(name)
        if not ok:
            log.append((name, "left", env.now))
            return
        log.append((name, order.round, env.now))
        yield env.timeout(talk)
        order.done(name)


def test_members_speak_in_order_round_after_round():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b", "c"])
    log = []
    # Started in reverse: the order, not process start order, decides who speaks.
    for name in ["c", "b", "a"]:
        env.process(speaker_process(env, order, name, log, rounds=2))
    env.run()
    assert [(n, r) for n, r, _ in log] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]
    assert [t for *_, t in log] == [0, 1, 2, 3, 4, 5]


def test_upcoming_and_positions_follow_the_floor():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b", "c"])
    assert order.upcoming() == ["a", "b", "c"]
    order.done("a")
    assert order.upcoming() == ["b", "c", "a"]
    assert order.positions() == {"b": 0, "c": 1, "a": 2}
    assert order.position("a") == 2 and order.position("zed") is None


def test_done_by_someone_else_is_an_error():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b"])
    with pytest.raises(RuntimeError, match="speaker is a"):
        order.done("b")


def test_pause_between_rounds_waits_for_next_round():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b"], pause_between_rounds=True)
    log, ends = [], []

    def chair():
        for _ in range(2):
            r = yield order.round_over()
            ends.append((r, env.now, order.speaker, order.upcoming()))
            yield env.timeout(10)  # the vote
            order.next_round()

    env.process(chair())
    for name in ["a", "b"]:
        env.process(speaker_process(env, order, name, log, rounds=2))
    env.run()
    assert ends[0] == (1, 2, None, ["a", "b"])
    assert [(n, r, t) for n, r, t in log] == [("a", 0, 0), ("b", 0, 1), ("a", 1, 12), ("b", 1, 13)]


def test_remove_current_speaker_passes_the_floor_and_wakes_the_removed():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b", "c"])
    b_turn = order.my_turn("b")
    c_turn = order.my_turn("c")
    order.remove("b")               # b was waiting: it wakes with False
    env.run()
    assert b_turn.value is False
    order.remove("a")               # a held the floor: c gets it
    env.run()
    assert c_turn.value is True and order.speaker == "c"
    assert order.upcoming() == ["c"]


def test_remove_before_the_speaker_keeps_the_speaker():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b", "c"])
    order.done("a")
    order.remove("a")
    assert order.speaker == "b" and order.upcoming() == ["b", "c"]


def test_close_wakes_everyone_with_false_and_unregisters():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b"])
    waiting = order.my_turn("b")
    assert env.open_turn_orders() == [order]
    order.close()
    env.run()
    assert waiting.value is False
    assert order.upcoming() == [] and order.speaker is None
    assert env.open_turn_orders() == []
    assert order.my_turn("a").value is False


def test_bad_members_are_rejected():
    env = SimEnvironment(FakeEngine())
    with pytest.raises(ValueError, match="twice"):
        TurnOrder(env, ["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        TurnOrder(env, [])


def test_done_after_close_is_a_no_op():
    env = SimEnvironment(FakeEngine())
    order = TurnOrder(env, ["a", "b"])
    order.close()
    order.done("a")
    assert order.speaker is None
