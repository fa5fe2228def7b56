"""The distance oracle: timers, receives over the graph, turns, hints, quality, and scale."""

from __future__ import annotations

import math
import random

import simpy

from fake_engine import FakeEngine
from runtime.memory import DistanceSource
from scalesim import Agent, SimEnvironment, World
from scalesim.distance import DistanceOracle
from scalesim.prediction_quality import kendall_tau_b
from scalesim.turns import TurnOrder


def make_env() -> tuple[SimEnvironment, DistanceOracle]:
    env = SimEnvironment(FakeEngine(), observer=DistanceOracle)
    assert isinstance(env.observer, DistanceOracle)
    return env, env.observer


class Sleeper(Agent):
    def __init__(self, name: str, naps: list[float]) -> None:
        super().__init__(name)
        self.naps = naps

    def run(self):
        for nap in self.naps:
            yield self.wait(nap)
            yield self.llm("hi", max_tokens=1)


class Sleepy(World):
    def setup(self, naps: dict[str, list[float]]) -> None:
        for name, n in naps.items():
            self.add(Sleeper(name, n))


def test_timers_give_exact_wake_times_and_order() -> None:
    env, oracle = make_env()
    world = Sleepy(env)
    world.setup(naps={"a": [5, 1], "b": [2, 10], "c": [9]})
    env.run(until=0.5)
    assert isinstance(oracle, DistanceSource)
    assert oracle.nearest(3) == ["b", "a", "c"]
    assert [oracle.distance(x) for x in "abc"] == [4.5, 1.5, 8.5]
    env.run(until=5.5)  # b called at 2 and sleeps to 12; a called at 5, sleeps to 6
    assert oracle.nearest(3) == ["a", "c", "b"]
    assert oracle.eta("b") == 12 and oracle.eta("a") == 6
    env.run(until=20)
    assert oracle.nearest(3) == []  # everyone finished


class Talker(Agent):
    def __init__(self, name: str, peer: str | None, delay: float) -> None:
        super().__init__(name)
        self.peer, self.delay = peer, delay

    def run(self):
        if self.peer is None:  # the listener: answers every message it gets
            while True:
                yield self.receive()
                yield self.llm("reply", max_tokens=1)
        else:
            while True:
                yield self.wait(self.delay)
                yield self.llm("speak", max_tokens=1)
                self.send(self.peer, "hello")


class Chat(World):
    def setup(self) -> None:
        self.add(Talker("listener", None, 0))
        self.add(Talker("speaker", "listener", 10))
        self.add(Sleeper("loner", [15]))


def test_a_receiver_is_estimated_from_its_in_neighbours() -> None:
    env, oracle = make_env()
    oracle.edge_delay = 0.5
    world = Chat(env)
    oracle.graph = world.graph
    world.setup()
    env.run(until=1)
    assert math.isinf(oracle.distance("listener"))  # no edge yet: unknown
    env.run(until=11)  # the speaker spoke once at 10: the edge exists; next at 20
    assert oracle.eta("speaker") == 20
    assert oracle.eta("listener") == 20.5
    assert oracle.nearest(3) == ["loner", "speaker", "listener"]


def test_turn_orders_and_hints() -> None:
    env, oracle = make_env()

    class Member(Agent):
        def __init__(self, name, order):
            super().__init__(name)
            self.order = order

        def run(self):
            while (yield self.order.my_turn(self)):
                yield self.wait(1)
                yield self.llm("turn", max_tokens=1)
                self.order.done(self)

    class Table(World):
        def setup(self):
            order = TurnOrder(self.env, ["x", "y", "z"])
            for n in ["z", "y", "x"]:
                self.add(Member(n, order))
            self.add(Sleeper("late", [100]))

    world = Table(env)
    world.setup()
    env.run(until=1.5)  # x spoke at 1; y holds the floor and is waiting its 1-unit timer
    assert oracle.nearest(3) == ["y", "z", "x"]
    world.hint("late", 0.1)
    assert oracle.nearest(1) == ["late"]


def test_a_member_of_several_turn_orders_is_estimated_by_its_nearest_turn() -> None:
    env, oracle = make_env()
    TurnOrder(env, ["a", "b", "c"], name="table")  # c speaks third here
    TurnOrder(env, ["x", "c"], name="chat")  # and second here
    oracle.checkpoint()
    assert oracle.estimates("c")["turn"] == env.now + oracle.turn_delay
    assert oracle.estimates("a")["turn"] == env.now
    assert "turn" not in oracle.estimates("nobody")


def test_predicted_ranks_reach_the_call_and_a_perfect_timer_world_scores_tau_1() -> None:
    env, oracle = make_env()
    world = Sleepy(env)
    world.setup(naps={f"s{i}": [i + 1, 20] for i in range(6)})
    calls = []
    env.completion_listeners.append(lambda call, done: calls.append(call))
    env.run(until=100)
    first = [c for c in calls if c.submit_time <= 6]
    assert [c.predicted_rank for c in first][1:] == [0, 1, 2, 3, 4]
    quality = oracle.quality()
    assert quality["kendall_tau"] == 1.0 and quality["snapshots"] >= 1


def test_explain_gives_the_estimates_the_eta_is_the_earliest_of() -> None:
    env, oracle = make_env()
    world = Sleepy(env)
    world.setup({"a": [3, 5], "b": [4], "c": [1, 1, 1]})
    env.run(until=2.5)
    assert set(oracle.explain("a")) == {"timer"}
    for agent in "abc":
        explained = oracle.explain(agent)
        assert min(explained.values(), default=math.inf) == oracle.eta(agent)
        assert oracle.source_of(agent) == min(explained, key=explained.__getitem__)
    assert oracle.explain("nobody") == {}
    oracle.on_submit("a")  # a call out of turn
    assert oracle.explain("a") == {"pending": env.now} and oracle.source_of("a") == "pending"


def test_kendall_tau_b() -> None:
    assert kendall_tau_b([(0, 0), (1, 1), (2, 2)]) == 1.0
    assert kendall_tau_b([(0, 2), (1, 1), (2, 0)]) == -1.0
    assert kendall_tau_b([(0, 0), (0, 0)]) is None
    assert abs(kendall_tau_b([(0, 0), (1, 2), (2, 1), (3, 3)]) - 2 / 3) < 1e-9


class Clock:
    """Stands in for the environment: a time and no turn orders."""

    now = 0.0

    def open_turn_orders(self) -> list:
        return []


def test_a_hundred_thousand_synthetic_agents() -> None:
    """The oracle alone at scale: random timers, interleaved queries, nearest stays sorted."""
    clock = Clock()
    oracle = DistanceOracle(clock)  # type: ignore[arg-type]
    rng = random.Random(0)
    n = 100_000
    wake = {}
    for i in range(n):
        wake[f"a{i}"] = rng.uniform(0, 1000)
        oracle.on_wait(f"a{i}", wake[f"a{i}"])
    for step in range(2000):  # the nearest agent calls, then sleeps again
        agent = oracle.nearest(1)[0]
        clock.now = wake[agent]
        oracle.on_submit(agent)
        oracle.on_finish(agent)
        wake[agent] = clock.now + rng.uniform(0, 1000)
        oracle.on_wait(agent, wake[agent])
        if step % 100 == 0:
            top = oracle.nearest(50)
            assert top == sorted(wake, key=wake.get)[:50]
    assert len(oracle._heap) <= 2 * n + 1024 + 1


class Patient(Agent):
    """Waits for its turn in ``turns``, for at most 30: with ``wait_for`` or an exact timer."""

    def __init__(self, name: str, turns: TurnOrder, bounded: bool, delay: float = 0) -> None:
        super().__init__(name)
        self.turns, self.bounded, self.delay = turns, bounded, delay

    def run(self):
        if self.delay:
            yield self.wait(self.delay)
        turn = self.turns.my_turn(self)
        yield self.wait_for(turn, 30) if self.bounded else turn | self.wait(30)
        yield self.llm("my line", max_tokens=1)
        self.turns.done(self)


def test_a_bounded_wait_is_an_upper_bound_not_an_exact_wake_up() -> None:
    # "first" holds the floor until 5; "second" speaks right after it, well before "loner"'s 20.
    for bounded in (True, False):
        env, oracle = make_env()
        world = World(env)
        turns = TurnOrder(env, ["first", "second"])
        world.add(Patient("first", turns, bounded, delay=5))
        world.add(Patient("second", turns, bounded))
        world.add(Sleeper("loner", [20]))
        env.run(until=1)
        if bounded:
            assert oracle.nearest(3) == ["first", "second", "loner"]
            assert oracle.eta("second") < 6
        else:  # an any-of with an exact timer reads as a wake-up at 30
            assert oracle.nearest(3) == ["first", "loner", "second"]
        env.run(until=6)
        assert oracle.eta("second") == math.inf  # it has spoken and finished


class Closer(Agent):
    """Speaks at 3, then closes a turn order (as a conversation that ends early)."""

    def __init__(self, name: str, turns: TurnOrder) -> None:
        super().__init__(name)
        self.turns = turns

    def run(self):
        yield self.wait(3)
        yield self.llm("bye", max_tokens=1)
        self.turns.close()


class Listener(Agent):
    def run(self):
        while True:
            yield self.receive()


def test_a_closed_turn_order_stops_counting_at_the_next_iteration() -> None:
    env, oracle = make_env()
    world = World(env)
    turns = TurnOrder(env, ["first", "second"])
    world.add(Patient("first", turns, True, delay=50))
    world.add(Listener("second"))  # listed in the order, but blocked elsewhere
    world.add(Closer("closer", turns))
    world.add(Sleeper("loner", [4, 100]))
    env.run(until=3.5)
    assert oracle.eta("second") < 51  # next after "first", which holds the floor until 50
    env.run(until=4.5)  # the order closed at 3; loner's call at 4 ran an engine iteration
    assert oracle.eta("second") == math.inf


def test_graph_estimates_on_a_cycle_do_not_outlive_their_source() -> None:
    # "a" is next in a turn order, so "b" (who hears from "a") inherits its estimate; once the
    # order closes, neither must keep it by reading it back from the other.
    env, oracle = make_env()
    world = World(env)
    oracle.graph = world.graph
    turns = TurnOrder(env, ["first", "a"])
    world.add(Patient("first", turns, True, delay=50))
    world.add(Listener("a"))
    world.add(Listener("b"))
    world.add(Closer("closer", turns))
    world.add(Sleeper("loner", [4, 100]))
    world.record_interaction("a", "b")  # they have messaged each other before
    world.record_interaction("b", "a")
    env.run(until=3.5)
    assert oracle.eta("a") < 51 and oracle.eta("b") == oracle.eta("a")
    env.run(until=4.5)  # the order closed at 3
    assert oracle.eta("a") == math.inf and oracle.eta("b") == math.inf
