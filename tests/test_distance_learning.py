"""The oracle on worlds it was not written for: stale estimates, learned call rates, trust."""

from __future__ import annotations

import math
import random

import networkx as nx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_engine import FakeEngine
from scalesim import Agent, SimEnvironment, World
from scalesim.call_rates import CallRates
from scalesim.distance import DistanceOracle


def make_env() -> tuple[SimEnvironment, DistanceOracle]:
    env = SimEnvironment(FakeEngine(), observer=DistanceOracle)
    assert isinstance(env.observer, DistanceOracle)
    return env, env.observer


class Person(Agent):
    """Sleeps in ``receive`` until its outing; meets neighbours; calls on some wake-ups."""

    def __init__(self, name: str, friends: list[str], period: float, call_every: int,
                 rng: random.Random) -> None:
        super().__init__(name)
        self.friends, self.period, self.call_every, self.rng = friends, period, call_every, rng
        self.wakes = 0

    def run(self):
        while True:
            yield self.receive(timeout=self.period * (0.5 + self.rng.random()))
            self.wakes += 1
            if self.wakes % self.call_every == 0:
                yield self.llm("news?", max_tokens=1)
            if self.friends and self.rng.random() < 0.3:
                self.send(self.rng.choice(self.friends), "hi")


class Contacts(World):
    def setup(self, people: int = 40, degree: int = 6, mixed: bool = True) -> None:
        graph = nx.connected_watts_strogatz_graph(people, degree, 0.1, seed=self.seed)
        for i in range(people):
            call_every = (1 if i % 4 == 0 else 7) if mixed else 3
            self.add(Person(f"p{i}", [f"p{j}" for j in graph[i]], 60.0, call_every,
                            self.random))


def test_no_estimate_falls_behind_the_clock_on_a_dense_graph() -> None:
    env, oracle = make_env()
    world = Contacts(env)
    world.setup()
    checked = 0
    while env.now < 2000:
        env.step()
        for agent in world.agents:
            if agent in oracle._pending:
                continue
            eta = oracle.eta(agent)
            assert eta >= env.now, (agent, eta, env.now, oracle.source_of(agent))
            checked += 1
    assert checked > 10_000
    # distances are not all zero: the far agents are far
    distances = [oracle.distance(a) for a in world.agents]
    assert sum(d > 0 for d in distances) > len(distances) // 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), people=st.integers(5, 25), degree=st.sampled_from([2, 4]),
       mixed=st.booleans())
def test_every_estimate_is_at_least_now_unless_a_call_is_pending(seed, people, degree, mixed):
    env, oracle = make_env()
    world = Contacts(env, seed=seed)
    world.setup(people=people, degree=degree, mixed=mixed)
    while env.now < 600:
        env.step()
        for agent in world.agents:
            if agent not in oracle._pending:
                assert oracle.eta(agent) >= env.now
                assert oracle.distance(agent) >= 0


def test_learned_rates_put_frequent_callers_first() -> None:
    # Everyone wakes as often; a quarter call on every wake-up, the rest on one in seven. The
    # wake-up times alone cannot tell them apart; the learned lags can.
    env, oracle = make_env()
    world = Contacts(env)
    world.setup(people=40)
    env.run(until=3000)
    frequent = {f"p{i}" for i in range(0, 40, 4)}
    nearest = oracle.nearest(10)
    assert len(set(nearest) & frequent) >= 7, nearest
    quality = oracle.quality()
    assert quality["call_rates"]["wakeups_then_call"] < 0.5
    assert quality["sources"]["learned"]["kendall_tau"] > quality["sources"]["learned"][
        "baseline_tau"]


def test_call_rates_resolve_open_wakeups_at_the_next_call() -> None:
    rates = CallRates(prior_weight=0)
    rates.woke("a", "outing", 10.0)
    rates.woke("a", "outing", 20.0)
    rates.woke("a", "message", 25.0)
    rates.called("a", 30.0)  # lags 20 and 10 at "outing", 5 at "message"
    assert rates.lag("a", "outing") == 15.0 and rates.lag("a", "message") == 5.0
    assert rates.lag("b", "outing") == 15.0  # pooled over agents for one never seen
    assert rates.lag("a", "elsewhere") == 0.0  # nothing known: a wake-up is a call
    rates.woke("a", "outing", 40.0)
    rates.called("a", 40.0)
    assert rates.lag("a", "outing") == 10.0
    assert rates.wake_interval("a") == 10.0 and rates.call_interval("a") == 10.0


class Liar(Agent):
    """Announces (by hint) its calls in the reverse of their true order; its timers are right."""

    def __init__(self, name: str, rng: random.Random) -> None:
        super().__init__(name)
        self.rng = rng

    def run(self):
        while True:
            yield self.receive(timeout=self.rng.uniform(1, 10))
            delay = self.rng.uniform(40, 100)
            self.home.hint(self, (100 - delay) / 4)  # the later it calls, the sooner it says
            yield self.wait(delay)
            yield self.llm("x", max_tokens=1)


class Liars(World):
    def setup(self, n: int = 60) -> None:
        for i in range(n):
            self.add(Liar(f"l{i}", self.random))


def test_a_source_that_mispredicts_is_distrusted_and_left_out() -> None:
    env, oracle = make_env()
    world = Liars(env)
    world.setup()
    env.run(until=20_000)
    sources = oracle.quality()["sources"]
    assert sources["timer"]["trusted_at_end"]
    # hints here are worse than recency, so they stop counting; the timers decide
    assert sources["hint"]["kendall_tau"] < sources["hint"]["baseline_tau"]
    assert sources["hint"]["kendall_tau"] < sources["timer"]["kendall_tau"]
    assert not oracle.prediction.trusted("hint")
    for agent in world.agents:
        assert oracle.source_of(agent) != "hint"


def test_an_agent_blocked_where_the_oracle_cannot_see_is_not_about_to_call() -> None:
    # It waits on a bare simpy timeout: after its call returns it is "acting" for as long as
    # the learned time from a returned call to the next one (50), then the last resort (its mean
    # call interval from now).
    env, oracle = make_env()

    class Hidden(Agent):
        def run(self):
            while True:
                yield self.llm("x", max_tokens=1)
                yield self.env.timeout(50)

    world = World(env)
    world.add(Hidden("h"))
    env.run(until=120)  # calls at 0, 50, 100
    assert oracle.source_of("h") == "active" and math.isclose(oracle.eta("h"), 150)
    oracle.rates.called("h", 120.0)  # as if the call at 150 had come early: a 20 gap learned
    oracle._update("h")
    env.run(until=145)  # 100 + the lag ((50 + 50 + 20) / 3 = 40) has passed
    assert oracle.eta("h") >= env.now and oracle.source_of("h") == "fallback"
