"""The stream estimator: next calls learned from arrivals and finishes alone, and the server's
source that puts a client's hints first.

Synthetic streams with a fake clock: lockstep rounds (the order repeats), chained calls of one
agent, successors in a conversation, agents that stop calling; the ordered-distance contract;
hints overriding the estimate; and a server whose session sends no hints using the estimator.
"""

from __future__ import annotations

import itertools
import math

import httpx
import openai
import pytest

from runtime.memory import OrderedDistanceSource
from scalesim.serve.hints import HintedDistance
from scalesim.serve.hints_or_estimate import HintsOrEstimate
from scalesim.serve.stream_estimator import StreamEstimator
from serve_harness import base_url, modeled_config, running_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lockstep(source, clock: FakeClock, order: list[str], rounds: int, gap: float = 10.0) -> None:
    """``rounds`` rounds: every agent of ``order`` submits (in that order), then all finish,
    then the client idles ``gap`` seconds."""
    for _ in range(rounds):
        clock.now += gap
        for agent in order:
            source.on_submit(agent)
            clock.now += 0.01
        for agent in order:
            clock.now += 0.5
            source.on_finish(agent)
        source.expire()


def predicted_order(source, agents) -> list[str]:
    return sorted(agents, key=source.order_key)


def test_it_is_an_ordered_distance_source():
    assert isinstance(StreamEstimator(FakeClock()), OrderedDistanceSource)
    assert isinstance(HintsOrEstimate(FakeClock()), OrderedDistanceSource)


def test_nothing_is_predicted_from_one_call_each():
    clock = FakeClock()
    est = StreamEstimator(clock)
    lockstep(est, clock, ["a", "b"], rounds=1)
    assert est.nearest(5) == [] and math.isinf(est.distance("a"))


def test_lockstep_rounds_predict_the_order_that_repeats():
    clock = FakeClock()
    est = StreamEstimator(clock)
    order = ["c", "a", "e", "b", "d"]
    lockstep(est, clock, order, rounds=4)
    assert est.rounds >= 2 and est.lockstep
    assert est.nearest(5) == order
    assert predicted_order(est, order) == order
    # Mid-round: those that called are last (next round), the rest keep their order.
    clock.now += 10.0
    for agent in order[:2]:
        est.on_submit(agent)
        clock.now += 0.01
    for agent in order[:2]:
        clock.now += 0.5
        est.on_finish(agent)
    assert est.nearest(5) == order[2:] + order[:2]


def test_lockstep_without_idle_gaps_is_still_learned_from_each_agents_period():
    clock = FakeClock()
    est = StreamEstimator(clock)
    order = ["d", "b", "a", "c"]
    for _ in range(5):  # one request at a time, back to back: no idle gap stands out
        for agent in order:
            est.on_submit(agent)
            clock.now += 0.3
            est.on_finish(agent)
            clock.now += 0.01
    assert est.nearest(4) == order


def test_chained_calls_keep_the_agent_next():
    clock = FakeClock()
    est = StreamEstimator(clock)
    # "t" calls twice in a row (a tool call, then the request with its result); others once;
    # one request at a time, and the client pauses between rounds.
    for _ in range(4):
        clock.now += 1.0
        for agent in ("a", "t", "b", "c"):
            calls = 2 if agent == "t" else 1
            for _ in range(calls):
                est.on_submit(agent)
                clock.now += 0.2
                est.on_finish(agent)
                clock.now += 0.01
    clock.now += 1.0
    est.on_submit("a")
    clock.now += 0.2
    est.on_finish("a")
    est.on_submit("t")
    clock.now += 0.2
    est.on_finish("t")
    assert est.nearest(1) == ["t"]  # its chained second call comes next
    est.on_submit("t")
    clock.now += 0.2
    est.on_finish("t")
    assert est.nearest(1) == ["b"]  # the chain is done; b's turn


def test_the_usual_successor_is_expected_when_an_agent_finishes():
    clock = FakeClock()
    est = StreamEstimator(clock)
    # A conversation: whenever "ann" finishes, "bob" answers; "x" and "y" call in between at
    # irregular moments.
    noise = itertools.cycle(["x", "y", "x", "x", "y"])
    for i in range(6):
        for agent in [next(noise)] * (1 + i % 2) + ["ann", "bob"]:
            est.on_submit(agent)
            clock.now += 0.2
            est.on_finish(agent)
            clock.now += 0.05
    est.on_submit("ann")
    clock.now += 0.2
    est.on_finish("ann")
    # bob is placed at the very next arrival (only an agent already late can be before it)
    assert est.order_key("bob") == est.arrivals and "bob" in est.nearest(2)


def test_an_agent_that_stops_calling_is_pushed_ever_farther_back():
    clock = FakeClock()
    est = StreamEstimator(clock)
    lockstep(est, clock, ["a", "b", "c"], rounds=4)
    fronts = 0
    for _ in range(32):  # "c" leaves the simulation
        lockstep(est, clock, ["a", "b"], rounds=1)
        fronts += est.nearest(1) == ["c"]
    # Late, then pushed on twice as far each time: at the front a logarithmic number of times.
    assert fronts <= 8
    assert est.nearest(3) == ["a", "b", "c"] and est.distance("c") > est.distance("b")


def test_keys_order_as_distances_pending_first_and_watchers_hear_changes():
    clock = FakeClock()
    est = StreamEstimator(clock)
    heard: list[str] = []
    est.watch(heard.append)
    lockstep(est, clock, ["a", "b", "c", "d"], rounds=3)
    assert set(heard) == {"a", "b", "c", "d"}
    est.on_submit("c")
    assert est.distance("c") == 0.0 and est.nearest(1) == ["c"]
    agents = ["a", "b", "c", "d", "stranger"]
    for x, y in itertools.permutations(agents, 2):
        if est.order_key(x) < est.order_key(y):
            assert est.distance(x) <= est.distance(y)


def test_the_same_stream_gives_the_same_keys():
    def run() -> list[float]:
        clock = FakeClock()
        est = StreamEstimator(clock)
        lockstep(est, clock, ["q", "w", "e", "r"], rounds=5, gap=3.0)
        return [est.order_key(a) for a in "qwer"]
    assert run() == run()


def test_a_hint_wins_over_the_estimate_and_dropping_it_brings_the_estimate_back():
    clock = FakeClock()
    source = HintsOrEstimate(clock)
    order = ["a", "b", "c"]
    lockstep(source, clock, order, rounds=4)
    assert source.nearest(3) == order
    estimate_c = source.order_key("c")
    source.hint("c", "never")
    assert source.nearest(3) == ["a", "b"] and math.isinf(source.distance("c"))
    source.hint("a", 1000.0, clock=0.0)  # far ahead: after b's estimate
    assert source.nearest(3) == ["b", "a"]
    source.hint("c", None)
    assert source.order_key("c") == estimate_c
    assert source.nearest(3) == ["b", "c", "a"]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_server_whose_session_sends_no_hints_uses_the_estimator(enabled):
    with running_server(modeled_config(stream_estimator=enabled)) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        for _ in range(3):  # three rounds of three agents, one after another, no hints
            for agent in ("ann", "bob", "cy"):
                client.chat.completions.create(
                    model="smollm2-135m", extra_headers={"X-ScaleSim-Agent": agent},
                    messages=[{"role": "user", "content": "Your turn."}], max_tokens=2)
        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
        summary = server.distance_summary()
    if enabled:
        assert isinstance(server.distance, HintsOrEstimate)
        estimated = [line for line in metrics.splitlines()
                     if line.startswith("scalesim_estimated_agents ")]
        assert estimated and float(estimated[0].split()[1]) >= 1
        assert summary["source"] == "hints, else the stream estimate"
        assert summary["stream_predictions"] > 0
    else:
        assert type(server.distance) is HintedDistance
        assert "scalesim_estimated_agents" not in metrics and summary["source"] == "hints"
