"""Every distance source keeps pending calls alike (runtime.memory.distance.CallTrackingSource).

The base alone is the source that predicts nothing; the recorded future, a replica's copy of the
driver's keys, the server's hints and the oracle add their predictions on top of it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fake_engine import FakeEngine
from runtime.memory.distance import CallTrackingSource, FutureSequence, OrderedDistanceSource
from runtime.replica_distances import ReplicaDistances
from scalesim import SimEnvironment
from scalesim.distance import DistanceOracle
from scalesim.serve.hints import HintedDistance


def oracle() -> DistanceOracle:
    env = SimEnvironment(FakeEngine(), observer=DistanceOracle)
    assert isinstance(env.observer, DistanceOracle)
    return env.observer


def replica() -> ReplicaDistances:
    source = ReplicaDistances()
    source.update(0.0, ["far"], np.array([50.0]))
    return source


def hinted() -> HintedDistance:
    source = HintedDistance(clock=lambda: 0.0)
    source.hint("far", 50.0, clock=0.0)
    return source


SOURCES = {
    "null": CallTrackingSource,
    "future": lambda: FutureSequence(["far", "b", "far"]),
    "replica": replica,
    "hints": hinted,
    "oracle": oracle,
}


@pytest.fixture(params=list(SOURCES))
def source(request) -> CallTrackingSource:
    return SOURCES[request.param]()


def test_every_source_is_an_ordered_distance_source(source):
    assert isinstance(source, OrderedDistanceSource)


def test_pending_calls_come_first_in_order_of_submission_and_are_counted(source):
    for agent in ["c", "a", "c"]:
        source.on_submit(agent)
    assert source.nearest(2) == ["c", "a"]
    assert source.pending("c") == 2 and source.pending("far") == 0
    assert source.distance("c") == source.distance("a") == 0.0
    assert source.order_key("c") < source.order_key("far")
    source.on_finish("c")  # one of its two calls
    assert source.pending("c") == 1 and source.distance("c") == 0.0
    source.on_finish("c")
    source.on_finish("stranger")  # never submitted here: ignored
    assert source.pending("c") == 0
    if not isinstance(source, DistanceOracle):  # to the oracle "c" is acting now: also due now
        assert source.nearest(1) == ["a"]


@pytest.mark.parametrize("name", ["null", "future", "replica", "hints"])
def test_watchers_hear_an_agent_when_its_pending_state_changes(name):
    source = SOURCES[name]()
    heard: list[str] = []
    source.watch(heard.append)
    source.on_submit("a")
    source.on_submit("a")  # already pending: its key stays
    source.on_finish("a")
    source.on_finish("a")
    source.on_finish("a")  # nothing pending any more
    assert heard == ["a", "a"]


def test_the_null_source_predicts_nothing():
    source = CallTrackingSource()
    assert source.distance("a") == math.inf and source.order_key("a") == math.inf
    assert source.nearest(3) == []
    source.on_submit("a")
    assert source.order_key("a") == CallTrackingSource.PENDING_KEY and source.nearest(3) == ["a"]
