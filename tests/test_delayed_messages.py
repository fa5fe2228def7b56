"""Messages that take simulated time to arrive: delivered on arrival, and seen by the oracle."""

from __future__ import annotations

import pytest

from runtime import build_engine
from scalesim import Agent, World
from scalesim.distance import DistanceOracle
from scalesim.environment import SimEnvironment
from tests.conftest import EchoExecutor
from tests.tiny_world import Shipping


def test_a_delayed_message_arrives_after_its_delay_and_the_oracle_knows_when():
    env = SimEnvironment(build_engine(EchoExecutor()), observer=DistanceOracle)
    world = Shipping(env, seed=0)
    world.setup(customers=1, transit=5.0, orders=1)
    oracle = env.observer
    assert isinstance(oracle, DistanceOracle)
    env.run(until=1.5)  # the order left at t=1 and arrives at t=6
    assert oracle.estimates("c0", lagged=False)["message"] == 6.0
    assert oracle.eta("c0") == 6.0  # exact, before any call was learned
    assert not world.agent("c0").mailbox.items
    env.run(until=5.99)
    assert not world.agent("c0").mailbox.items
    env.run(until=7)
    assert "message" not in oracle.estimates("c0")  # arrived: nothing on the way any more
    assert world.graph["s0"]["c0"]["messages"] == 1


def test_the_first_of_several_messages_on_the_way_counts():
    env = SimEnvironment(build_engine(EchoExecutor()), observer=DistanceOracle)
    world = Shipping(env, seed=0)
    world.setup(customers=1, transit=10.0, orders=3)
    env.run(until=3.5)  # orders left at 1, 2 and 3
    assert env.observer.estimates("c0", lagged=False)["message"] == 11.0


def test_a_world_default_delay_and_bad_delays():
    class Slow(Shipping):
        default_message_delay = 4.0

    env = SimEnvironment(build_engine(EchoExecutor()), observer=DistanceOracle)
    world = Slow(env, seed=0)
    world.setup(customers=1, orders=1)
    reader = world.agent("c0")
    message = world.agent("s0").send(reader, "hello")  # no delay named: the world's
    assert message.arrival == 4.0
    with pytest.raises(ValueError, match="message delay must be a finite number >= 0"):
        world.agent("s0").send(reader, "x", delay=-1)


def test_agents_that_never_call_are_not_ranked_but_still_time_their_messages():
    env = SimEnvironment(build_engine(EchoExecutor()), observer=DistanceOracle)
    world = Shipping(env, seed=0)
    world.setup(customers=2, transit=5.0, orders=2)
    oracle = env.observer
    env.run(until=1.5)
    ranked = oracle.nearest(10)
    assert "s0" not in ranked and "s1" not in ranked  # shippers never call
    assert ranked[0] == "c0"  # its order arrives first, at 6
    assert oracle.eta("s0") == float("inf")
