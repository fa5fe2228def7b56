"""Calls that take simulated time: the agent resumes at its due time, the clock goes on meanwhile,
and the engine runs only before the clock passes a due time it has not answered."""

from __future__ import annotations

import random
from typing import Any, Callable, Generator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_engine import FakeEngine
from runtime import Completion, Engine, build_engine
from runtime.interface import StepResult
from runtime.memory.distance import CallTrackingSource
from scalesim import Agent, SimEnvironment, World
from scalesim.config import ConfigError, load_config
from scalesim.distance import DistanceOracle
from tests.conftest import EchoExecutor


class Scripted(Agent):
    """Runs a script function as its life."""

    def __init__(self, name: str, script: Callable[["Scripted"], Generator[Any, Any, None]]
                 ) -> None:
        super().__init__(name)
        self.script = script
        self.log: list[Any] = []

    def run(self) -> Generator[Any, Any, None]:
        yield from self.script(self)


class CountingFake(FakeEngine):
    """A fake engine that counts its iterations and the dues it was given."""

    def __init__(self) -> None:
        super().__init__(lambda r: f"{r.agent_id}:{r.prompt}")
        self.steps = 0

    def step(self) -> Any:
        self.steps += 1
        return super().step()


def test_a_call_returns_its_duration_later_while_the_world_goes_on():
    engine = CountingFake()
    env = SimEnvironment(engine)
    world = World(env)

    def thinker(a: Scripted) -> Generator[Any, Any, None]:
        yield a.wait(1)
        reply = yield a.llm("plan", duration=10)
        a.log.append((a.now, reply.text))

    def ticker(a: Scripted) -> Generator[Any, Any, None]:
        for _ in range(4):
            yield a.wait(3)
            a.log.append(a.now)

    slow = world.add(Scripted("slow", thinker))
    clock = world.add(Scripted("clock", ticker))
    env.run()
    assert slow.log == [(11, "slow:plan")]
    assert clock.log == [3, 6, 9, 12]  # the other agent was not held up by the call
    assert engine.requests[0].due == 11


def test_calls_of_many_instants_share_one_engine_iteration():
    engine = CountingFake()
    env = SimEnvironment(engine, call_duration=10)
    world = World(env)

    def caller(a: Scripted) -> Generator[Any, Any, None]:
        yield a.wait(int(a.name))
        yield a.llm("hi")
        a.log.append(a.now)

    agents = [world.add(Scripted(str(i), caller)) for i in range(5)]
    env.run()
    assert [a.log for a in agents] == [[10], [11], [12], [13], [14]]
    # The engine ran only when the first due time came (t=10): one iteration answered all five.
    assert engine.steps == 1
    assert env.occupancy.iterations == 1 and env.occupancy.sequences_per_step == 5
    # five calls in flight for 10 time units each, over 14 units
    assert env.occupancy.mean_in_flight == pytest.approx(50 / 14)


def test_answers_due_at_one_time_are_handed_over_in_request_order():
    # Request 1 is answered in a later engine iteration than request 2 (the echo executor
    # answers one character per iteration and its reply is longer), both due at t=4.
    engine = build_engine(EchoExecutor(max_num_seqs=8))
    env = SimEnvironment(engine)
    world = World(env)
    order: list[str] = []

    def caller(prompt: str, wait: float, duration: float
               ) -> Callable[[Scripted], Generator[Any, Any, None]]:
        def script(a: Scripted) -> Generator[Any, Any, None]:
            yield a.wait(wait)
            yield a.llm(prompt, duration=duration)
            order.append(a.name)
            a.log.append(a.now)
        return script

    first = world.add(Scripted("a", caller("a long question", 0, 4)))
    second = world.add(Scripted("b", caller("x", 1, 3)))
    env.run()
    assert first.log == [4] and second.log == [4]
    assert order == ["a", "b"]


def test_a_call_due_when_the_run_ends_does_not_return():
    # As for any event at `until`: simpy stops before it (the clock ends at 5).
    env = SimEnvironment(FakeEngine())
    world = World(env)

    def script(a: Scripted) -> Generator[Any, Any, None]:
        yield a.llm("hi", duration=5)
        a.log.append(a.now)

    agent = world.add(Scripted("a", script))
    env.run(until=5)
    assert agent.log == [] and len(env.in_flight) == 1 and env.now == 5
    env.run(until=6)
    assert agent.log == [5] and not env.in_flight


def test_a_negative_duration_is_refused_by_name():
    env = SimEnvironment(FakeEngine())
    world = World(env)

    def script(a: Scripted) -> Generator[Any, Any, None]:
        yield a.llm("hi", duration=-1)

    world.add(Scripted("a", script))
    with pytest.raises(ValueError, match="duration must be a finite number"):
        env.run()
    with pytest.raises(ValueError, match="call_duration"):
        SimEnvironment(FakeEngine(), call_duration=float("nan"))


@pytest.mark.parametrize("bad", [-1, "inf"])
def test_a_bad_sim_call_duration_is_a_config_error_naming_the_key(bad: Any):
    with pytest.raises(ConfigError, match=r"sim\.call_duration"):
        load_config({"world": {"class": "worlds.town:Town"}, "sim": {"call_duration": bad}})
    config = load_config({"world": {"class": "worlds.town:Town"}},
                         {"sim.call_duration": "2.5"})
    assert config.sim.call_duration == 2.5


def test_a_run_stops_at_its_end_with_later_calls_still_in_flight(tmp_path):
    import scalesim

    def run(until: float, out: str) -> Any:
        return scalesim.simulate("worlds/town.yaml", out=tmp_path / out, engine=FakeEngine(),
                                 world__params__villagers=3, sim__until=until,
                                 sim__call_duration=30)

    whole = run(1320, "whole").trace
    assert (whole["due"] == whole["sim_time"] + 30).all()
    assert (whole["sim_time_done"] == whole["due"]).all()
    until = float(whole["sim_time"][whole["sim_time"] > 500].min()) + 10
    part = run(until, "part")
    # The same run up to the end; the calls due after it are still in flight there.
    made = whole[whole["sim_time"] < until]
    assert part.trace["request_id"].tolist() == made[made["due"] < until]["request_id"].tolist()
    assert part.summary["unfinished_calls"] == int((made["due"] >= until).sum()) > 0
    assert part.summary["occupancy"]["mean_calls_in_flight"] > 0


def world_with_oracle(engine: Any, call_duration: float
                      ) -> tuple[SimEnvironment, World, DistanceOracle]:
    """An environment on ``engine`` whose observer is a distance oracle, and a world on it."""
    oracle: list[DistanceOracle] = []

    def observe(env: SimEnvironment) -> DistanceOracle:
        oracle.append(DistanceOracle(env, call_duration=call_duration))
        return oracle[0]

    env = SimEnvironment(engine, observer=observe, call_duration=call_duration)
    return env, World(env), oracle[0]


def test_the_oracle_orders_pending_calls_by_due_time():
    env, world, source = world_with_oracle(FakeEngine(), call_duration=5)

    def caller(duration: float | None) -> Callable[[Scripted], Generator[Any, Any, None]]:
        def script(a: Scripted) -> Generator[Any, Any, None]:
            yield a.llm("hi", duration=duration)
        return script

    def sleeper(a: Scripted) -> Generator[Any, Any, None]:
        yield a.wait(2)

    world.add(Scripted("late", caller(20)))     # due 20: stands at 15
    world.add(Scripted("default", caller(None)))  # due 5: stands at 0, now
    world.add(Scripted("soon", caller(1)))      # due 1: stands at -4
    world.add(Scripted("sleeper", sleeper))     # wakes at 2
    env.run(until=0.5)
    assert source.nearest(4)[:3] == ["soon", "default", "sleeper"]
    assert source.nearest(4)[3] == "late"
    assert source.distance("soon") == 0 and source.distance("default") == 0
    assert source.distance("late") == pytest.approx(14.5)  # after the sleeper's call
    assert source.order_key("late") > source.order_key("sleeper")


def test_queued_calls_rank_as_now_for_eviction_and_keep_their_due_order_for_prefetch():
    # Which queued call the scheduler reaches first depends on its budget and on what is
    # resident, not only on due times: the eviction order ties them (recency decides).
    env, world, source = world_with_oracle(FakeEngine(), call_duration=5)

    def caller(at: float, duration: float | None) -> Callable[[Scripted], Generator]:
        def script(a: Scripted) -> Generator[Any, Any, None]:
            yield a.wait(at)
            yield a.llm("hi", duration=duration)
            yield a.wait(100)
        return script

    world.add(Scripted("early", caller(0, None)))   # due 5
    world.add(Scripted("later", caller(1, None)))   # due 6
    world.add(Scripted("soon", caller(1, 2)))       # due 3: sooner than the default
    world.add(Scripted("long", caller(0, 30)))      # due 30: stands at 25
    world.add(Scripted("sleeper", caller(10, None)))
    env.run(until=1.5)
    keys = {a: source.order_key(a) for a in ("early", "later", "soon", "long", "sleeper")}
    assert keys["early"] == keys["later"] == keys["soon"] == CallTrackingSource.PENDING_KEY
    assert keys["sleeper"] == 10 and keys["long"] == 25
    assert source.nearest(5) == ["soon", "early", "later", "sleeper", "long"]
    env.run(until=7)  # the default calls returned: their keys are estimates again
    assert all(source.order_key(a) > 7 for a in ("early", "later", "soon"))
    assert source.order_key("long") == 30  # answered ahead: held until it resumes at 30


class EarliestDueFirst(FakeEngine):
    """A fake engine that answers one request per step, the earliest due (a full engine)."""

    def step(self) -> Any:
        if not self._queue:
            return super().step()
        first = min(self._queue, key=lambda r: (r.due, r.request_id))
        rest = [r for r in self._queue if r is not first]
        self._queue = [first]
        try:
            return super().step()
        finally:
            self._queue = rest


def test_an_answer_held_until_its_due_time_is_no_longer_a_pending_call():
    env, world, source = world_with_oracle(EarliestDueFirst(), call_duration=10)

    def caller(duration: float) -> Callable[[Scripted], Generator[Any, Any, None]]:
        def script(a: Scripted) -> Generator[Any, Any, None]:
            yield a.llm("hi", duration=duration)
            a.log.append(a.now)
        return script

    answered = world.add(Scripted("answered", caller(10)))  # answered first, resumes at 10
    world.add(Scripted("queued", caller(15)))  # still queued: stands at 5
    seen: list[tuple[Any, ...]] = []

    def at_hold(call: Any) -> None:
        seen.append((call.agent_id, env.now, source.pending(call.agent_id),
                     source.nearest(2), source.order_key(call.agent_id)))

    env.held_listeners.append(at_hold)
    env.run(until=12)
    agent, now, pending, nearest, key = seen[0]
    assert (agent, now, pending) == ("answered", 0, 0)
    # Its memory is next needed after it resumes at 10, so the queued call (at 5) comes first;
    # kept pending, it would have stood at 0, before every queued call.
    assert nearest == ["queued", "answered"] and key >= 10
    assert answered.log == [10] and source.pending("answered") == 0


def test_a_held_answer_handed_over_does_not_end_another_pending_call():
    source = CallTrackingSource()
    source.on_submit("a")
    source.on_submit("a")
    source.on_answered("a", due=5.0)  # the first call is answered ahead of its due time
    assert source.pending("a") == 1 and source.distance("a") == 0
    source.on_finish("a")  # ... and handed over: the second call is still pending
    assert source.pending("a") == 1
    source.on_finish("a")
    assert source.pending("a") == 0


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("executor", ["hf", "torch"])
def test_the_real_executors_serve_calls_that_take_simulated_time(executor: str, tmp_path):
    import scalesim

    result = scalesim.simulate("worlds/town.yaml", out=tmp_path, runtime__executor=executor,
                               world__params__villagers=3, world__params__max_tokens=4,
                               sim__until=800, sim__call_duration=5)
    trace = result.trace
    assert len(trace) > 0 and trace["error"].isna().all()
    assert (trace["due"] == trace["sim_time"] + 5).all()
    assert (trace["sim_time_done"] == trace["due"]).all()
    assert result.summary["occupancy"]["steps"] > 0


# -- random worlds -----------------------------------------------------------------------------

#: One step of an agent's life: wait, call (with a duration), send to another agent, receive.
Action = tuple[str, int, int]
ACTIONS = st.tuples(st.sampled_from(["wait", "call", "call", "send", "receive"]),
                    st.integers(0, 6), st.integers(0, 5))


class Random(Agent):
    """Plays a random script and checks every wake-up against the time it is due."""

    def __init__(self, name: str, script: list[Action], peers: int, log: list[Any]) -> None:
        super().__init__(name)
        self.script, self.peers, self.log = script, peers, log

    def run(self) -> Generator[Any, Any, None]:
        for kind, amount, other in self.script:
            start = self.now
            if kind == "wait":
                yield self.wait(amount / 2)
                assert self.now == start + amount / 2, "a timer woke at the wrong time"
            elif kind == "call":
                duration = None if amount == 6 else amount / 2  # None: the world's default
                reply = yield self.llm(f"q{len(self.log)}", duration=duration,
                                       max_tokens=1 + other)
                due = start + (self.env.call_duration if duration is None else duration)
                assert self.now == due, "an agent resumed before or after its due time"
                self.log.append((self.now, self.name, "reply", reply.text))
            elif kind == "send":
                self.send(f"a{other % self.peers}", self.now)
            else:
                message = yield self.receive(timeout=amount + 1)
                sent = None if message is None else message.content
                assert sent is None or sent <= self.now
            self.log.append((self.now, self.name, kind, amount))


def run_random_world(scripts: list[list[Action]], default: float, executor: bool
                     ) -> tuple[list[Any], list[float], list[tuple[int, float, float]]]:
    engine: Any = build_engine(EchoExecutor(max_num_seqs=3)) if executor else FakeEngine()
    env = SimEnvironment(engine, call_duration=default)
    world = World(env)
    log: list[Any] = []
    for i, script in enumerate(scripts):
        world.add(Random(f"a{i}", script, len(scripts), log))
    times: list[float] = []
    dues: list[tuple[int, float, float]] = []
    env.completion_listeners.append(
        lambda call, done: dues.append((done.request_id, call.due, call.submit_time)))
    step = env.step

    def timed_step() -> None:
        step()
        times.append(env.now)

    env.step = timed_step  # type: ignore[method-assign]
    env.run()
    assert isinstance(engine, (Engine, FakeEngine))
    return log, times, dues


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts=st.lists(st.lists(ACTIONS, max_size=8), min_size=1, max_size=5),
       default=st.sampled_from([0.0, 0.5, 2.0]), executor=st.booleans())
def test_random_worlds_resume_on_time_in_order_and_reproducibly(scripts, default, executor):
    log, times, dues = run_random_world(scripts, default, executor)
    assert times == sorted(times), "the clock went backwards"
    # Every agent resumed at its due time (checked inside); answers came out in due order,
    # request order among equal due times.
    assert [d for _, d, _ in dues] == sorted(d for _, d, _ in dues)
    for (r1, d1, _), (r2, d2, _) in zip(dues, dues[1:]):
        assert d1 < d2 or r1 < r2, "a tie broken out of request order"
    assert run_random_world(scripts, default, executor) == (log, times, dues)


class Shuffling(FakeEngine):
    """A fake engine that answers a random part of its queue in each iteration, in random order:
    an engine whose speed and batching (memory hits and misses, reply lengths) vary."""

    def __init__(self, seed: int) -> None:
        super().__init__(lambda r: f"{r.agent_id}:{r.prompt}")
        self.rng = random.Random(seed)

    def step(self) -> Any:
        queue, self._queue = self._queue, []
        self.rng.shuffle(queue)
        keep = self.rng.randrange(len(queue)) if queue else 0
        self._queue = queue[:keep]
        return StepResult([Completion(r.request_id, r.agent_id, self._reply(r), 1, 0, 1, "stop",
                                      0.0, 0.0, 0.0) for r in queue[keep:]],
                          batch=len(queue), steps=1 if queue else 0, tokens=len(queue))


def agents_log(scripts: list[list[Action]], default: float, engine: Any) -> list[Any]:
    env = SimEnvironment(engine, call_duration=default)
    world = World(env)
    log: list[Any] = []
    for i, script in enumerate(scripts):
        world.add(Random(f"a{i}", script, len(scripts), log))
    env.run()
    return log


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts=st.lists(st.lists(ACTIONS, max_size=8), min_size=1, max_size=5),
       default=st.sampled_from([0.0, 0.5, 2.0]), seeds=st.lists(st.integers(0, 2**16),
                                                                min_size=2, max_size=2))
def test_what_agents_do_does_not_depend_on_how_the_engine_batches(scripts, default, seeds):
    # The same world on engines that answer its calls in different iterations and orders: every
    # agent does the same things at the same times (the memory policy, the budget and the
    # executor change only the engine's timing, so they cannot change a run either).
    reference = agents_log(scripts, default, FakeEngine(lambda r: f"{r.agent_id}:{r.prompt}"))
    for seed in seeds:
        assert agents_log(scripts, default, Shuffling(seed)) == reference
