"""The World/Agent API and its coupling to the engine, on the character-level fake executor."""

from __future__ import annotations

import pytest

from runtime import RequestError
from scalesim import Agent, SimEnvironment, World


def make_world(engine, seed: int = 0) -> World:
    return World(SimEnvironment(engine), seed=seed)


class Scripted(Agent):
    """Runs a script function as its life."""

    def __init__(self, name, script, **kw):
        super().__init__(name, **kw)
        self.script = script
        self.log: list = []

    def run(self):
        yield from self.script(self)


def test_llm_calls_take_zero_sim_time(echo_engine):
    def script(a):
        yield a.wait(5)
        done = yield a.llm("hi")
        a.log.append((a.now, done.text))

    world = make_world(echo_engine)
    agent = world.add(Scripted("ann", script))
    world.env.run()
    assert agent.log == [(5, "ann:hi")]


def test_calls_of_one_instant_share_a_batch(echo_engine):
    def script(a):
        yield a.llm("x")

    world = make_world(echo_engine)
    for name in ("a", "b", "c"):
        world.add(Scripted(name, script))
    world.env.run()
    assert sorted(echo_engine.executor.batches[0]) == [0, 1, 2]


def test_new_calls_join_the_running_batch(echo_engine):
    """A short call finishes, its agent asks again, and that call runs beside the long one."""

    def short(a):
        first = yield a.llm("s")
        second = yield a.llm("t")
        a.log += [first.request_id, second.request_id]

    def long(a):
        done = yield a.llm("a much longer prompt")
        a.log.append(done.request_id)

    world = make_world(echo_engine)
    s = world.add(Scripted("s", short))
    l_ = world.add(Scripted("l", long))
    world.env.run()
    second_id, long_id = s.log[1], l_.log[0]
    together = [b for b in echo_engine.executor.batches if second_id in b and long_id in b]
    assert together, echo_engine.executor.batches
    assert world.env.now == 0


def test_send_receive_and_the_interaction_graph(echo_engine):
    def sender(a):
        yield a.wait(1)
        a.send("bob", "hello")
        a.send("bob", "again")

    def receiver(a):
        first = yield a.receive()
        second = yield a.receive()
        a.log += [(first.sender, first.content, first.time), second.content]

    world = make_world(echo_engine)
    world.add(Scripted("amy", sender))
    bob = world.add(Scripted("bob", receiver))
    world.env.run()
    assert bob.log == [("amy", "hello", 1), "again"]
    assert world.graph["amy"]["bob"]["messages"] == 2


def test_receive_timeout_gives_none_and_keeps_late_messages(echo_engine):
    def late_sender(a):
        yield a.wait(10)
        a.send("bob", "late")

    def receiver(a):
        nothing = yield a.receive(timeout=3)
        a.log.append((a.now, nothing))
        message = yield a.receive()
        a.log.append((a.now, message.content))

    world = make_world(echo_engine)
    world.add(Scripted("amy", late_sender))
    bob = world.add(Scripted("bob", receiver))
    world.env.run()
    assert bob.log == [(3, None), (10, "late")]


def test_a_failed_request_stops_only_its_agent():
    from runtime import build_engine
    from tests.conftest import EchoExecutor

    engine = build_engine(EchoExecutor(max_context=80))

    def too_long(a):
        yield a.llm("x" * 100)
        a.log.append("unreachable")

    def fine(a):
        yield a.wait(1)
        done = yield a.llm("ok")
        a.log.append(done.text)

    def catches(a):
        try:
            yield a.llm("y" * 100)
        except RequestError as exc:
            a.log.append("caught: " + str(exc).split(":")[0])

    world = make_world(engine)
    bad = world.add(Scripted("bad", too_long))
    good = world.add(Scripted("good", fine))
    careful = world.add(Scripted("careful", catches))
    world.env.run()
    assert bad.log == [] and good.log == ["good:ok"]
    assert careful.log and careful.log[0].startswith("caught: request")
    assert [name for name, _ in world.failures] == ["bad"]


def test_world_random_is_seeded(echo_engine):
    a = make_world(echo_engine, seed=7).random.random()
    b = make_world(echo_engine, seed=7).random.random()
    c = make_world(echo_engine, seed=8).random.random()
    assert a == b != c


def test_run_must_be_a_generator():
    class Broken(Agent):
        def run(self):
            return None

    with pytest.raises(TypeError, match="generator"):
        Broken("x")


def test_duplicate_agent_names_are_rejected(echo_engine):
    def script(a):
        yield a.wait(1)

    world = make_world(echo_engine)
    world.add(Scripted("a", script))
    with pytest.raises(ValueError, match="already exists"):
        world.add(Scripted("a", script))


def test_sampling_seed_is_derived_from_the_world_seed(echo_engine):
    seen = []

    def script(a):
        call = a.llm("x", temperature=0.7)
        seen.append(call.request.sampling.seed)
        yield call

    for _ in range(2):
        world = make_world(echo_engine, seed=3)
        world.add(Scripted("a", script))
        world.env.run()
    assert seen[0] is not None and seen[0] == seen[1]


def test_a_run_collects_garbage_rarely_and_restores_the_collector():
    import gc

    from scalesim.environment import relaxed_gc

    before = gc.get_threshold()
    with relaxed_gc(young=123_456):
        assert gc.get_threshold()[0] == 123_456
    assert gc.get_threshold() == before
    from fake_engine import FakeEngine

    env = SimEnvironment(FakeEngine())
    seen = []
    env.process(_record_threshold(env, seen))
    env.run()
    assert seen and seen[0] > before[0] and gc.get_threshold() == before


def _record_threshold(env, seen):
    import gc

    seen.append(gc.get_threshold()[0])
    yield env.timeout(1)


def test_the_front_end_uses_the_engine_interface_only():
    """A run declares its agents, feeds the memory manager the oracle, listens when it records,
    and a world's placement and a cancelled call go through the interface."""
    from fake_engine import FakeEngine
    from runtime import Request
    from scalesim.config import load_config
    from scalesim.distance import DistanceOracle
    from scalesim.simulation import Simulation

    engine = FakeEngine()
    config = load_config({"world": {"class": "tests.tiny_world:Pingers",
                                    "params": {"agents": 2, "rounds": 1}}, "sim": {"until": 5}})
    sim = Simulation(config, engine=engine)
    world = sim.build_world()
    assert [d[0] for d in engine.declared] == ["p0", "p1"]
    assert isinstance(engine.distance, DistanceOracle)
    assert len(engine.listeners) == 1  # the recorder's memory log
    world.place("p1", 3)
    assert engine.placed == {"p1": 3}

    env = SimEnvironment(FakeEngine())
    request_ids = []

    def asker(env):
        call = env.submit("ann", Request("ann", "hi"))
        request_ids.append(max(env.in_flight))
        with pytest.raises(RequestError, match="called off"):
            yield call

    env.process(asker(env))
    while not env.in_flight:
        env.step()  # the process starts and submits
    assert env.engine.cancel(request_ids[0], "called off")
    assert not env.engine.cancel(12345)
    env.run()
    assert not env.in_flight
