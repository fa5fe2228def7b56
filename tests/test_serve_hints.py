"""Client hints as invocation distances: the source itself, its endpoints, and the manager.

:class:`~scalesim.serve.hints.HintedDistance` must satisfy the runtime's ordered-distance
contract (a key that orders agents as their distances do), treat stale hints and stale ``seq``
as the module says, and, under the ``scalesim`` policy, make the memory manager evict the
agent hinted farthest instead of the least recently used one.
"""

from __future__ import annotations

import itertools
import math
import time

import httpx
import openai
import pytest

from runtime.memory import OrderedDistanceSource
from scalesim.serve.hints import HintedDistance
from scalesim.serve.protocol import AgentHint
from serve_harness import MODELED, base_url, running_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def source():
    clock = FakeClock()
    hints = HintedDistance(clock)
    hints.clock = clock  # type: ignore[attr-defined]
    return hints


def test_it_is_an_ordered_distance_source(source):
    assert isinstance(source, OrderedDistanceSource)


def test_pending_first_then_hints_then_unknown_then_never(source):
    source.hint("late", 50.0, clock=10.0)      # 40 units ahead
    source.hint("soon", 12.0, clock=10.0)      # 2 ahead
    source.hint("done", "never")
    source.on_submit("calling")
    assert source.nearest(10) == ["calling", "soon", "late"]
    assert source.distance("calling") == 0.0
    assert source.distance("soon") == pytest.approx(2.0)
    assert source.distance("late") == pytest.approx(40.0)
    assert math.isinf(source.distance("stranger")) and math.isinf(source.distance("done"))
    order = sorted(["done", "stranger", "late", "soon", "calling"], key=source.order_key)
    assert order == ["calling", "soon", "late", "stranger", "done"]
    # The contract: a smaller key never has a larger distance.
    for a, b in itertools.permutations(order, 2):
        if source.order_key(a) < source.order_key(b):
            assert source.distance(a) <= source.distance(b)
    source.on_finish("calling")
    assert source.nearest(1) == ["soon"]


def test_null_drops_a_hint_and_watchers_hear_every_change(source):
    heard: list[str] = []
    source.watch(heard.append)
    source.hint("a", 5.0, clock=0.0)
    source.hint("a", None)
    source.on_submit("b")
    source.on_finish("b")
    assert heard == ["a", "a", "b", "b"]
    assert math.isinf(source.distance("a"))


def test_a_hint_that_passed_is_expired_not_read_as_zero(source):
    source.hint("a", 5.0, clock=0.0)
    source.clock.now += 4.0
    assert source.expire() == 0 and source.distance("a") == pytest.approx(1.0)
    source.clock.now += 2.0
    assert source.expire() == 1
    assert math.isinf(source.distance("a")) and source.nearest(5) == []


def test_stale_seq_is_dropped_per_session(source):
    assert source.bulk("s1", 0.0, 2, [AgentHint(agent="a", eta=10.0)])
    assert not source.bulk("s1", 0.0, 2, [AgentHint(agent="a", eta=1.0)])
    assert not source.bulk("s1", 0.0, 1, [AgentHint(agent="a", eta=1.0)])
    assert source.bulk("s2", 0.0, 1, [AgentHint(agent="b", eta=1.0)])
    assert source.distance("a") == pytest.approx(10.0)
    assert source.stale == 2


def test_bad_hints_never_raise(source):
    source.hint("a", float("nan"), clock=0.0)
    source.hint("b", 3.0, clock=float("nan"))
    source.hint("c", -50.0, clock=0.0)  # in the past: due now
    assert math.isinf(source.distance("a"))
    assert source.distance("c") == 0.0


def modeled(policy: str, device_bytes: int | None = None) -> dict:
    runtime = {**MODELED["runtime"], "memory": {"policy": policy, "device_bytes": device_bytes},
               "modeled": {**MODELED["runtime"]["modeled"], "lora_rank": 0,
                           "prefix_tokens": 64}}
    return {"runtime": runtime, "serve": {"port": 0}}


def call(client, agent: str, **extra) -> None:
    client.chat.completions.create(
        model="smollm2-135m", extra_headers={"X-ScaleSim-Agent": agent},
        messages=[{"role": "system", "content": f"{agent}: that is who you are."},
                  {"role": "user", "content": "What now?"}], **extra)


def resident_after(policy: str, hint_body: dict | None) -> set[str]:
    """Serve a, b (budget: two personas), send the hints, serve c: who stayed resident."""
    with running_server(modeled(policy)) as probe:
        call(openai.OpenAI(base_url=base_url(probe), api_key="-"), "a")
        # One call's cached KV: its persona's segment and what it computed after it.
        size = sum(o.nbytes for o in probe.engine.memory.objects.values()
                   if o.kind == "prefix_kv")
    with running_server(modeled(policy, device_bytes=2 * size + size // 2)) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        call(client, "a")
        call(client, "b")
        if hint_body is not None:
            r = httpx.post(f"{base_url(server)}/scalesim/hints", json=hint_body)
            assert r.json()["applied"] is True
        call(client, "c")
        return {user for o in server.engine.memory.resident.values()
                if o.kind == "prefix_kv" and o.parent is None for user in o.users}


def test_scalesim_policy_evicts_the_agent_hinted_done_not_the_oldest():
    hints = {"session": "sim", "clock": 0.0, "seq": 1,
             "hints": [{"agent": "a", "eta": 1000.0}, {"agent": "b", "eta": "never"}]}
    assert resident_after("scalesim", hints) == {"a", "c"}
    assert resident_after("lru", hints) == {"b", "c"}  # the baseline ignores hints


def test_per_request_hints_and_update_shim_reach_the_source():
    with running_server(modeled("scalesim")) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        call(client, "a", extra_body={"scalesim": {
            "session": "s", "clock": 10.0, "next_eta": 30.0, "kind": "exact",
            "hints": [{"agent": "b", "eta": 11.0}, {"agent": "z", "eta": "never"}]}})
        r = httpx.post(f"{base_url(server)}/update", json={"distances": {"q": 3, "r": 7}})
        assert r.status_code == 200 and r.json() == {"applied": 2}
        source = server.distance
        sync = server.loop.call(lambda: (source.nearest(10), source.kind_of("a"),
                                         source.distance("z")))
        nearest, kind, z = sync.result(5)
        assert nearest[:4] == ["b", "q", "r", "a"] and kind == "exact" and math.isinf(z)
        stale = httpx.post(f"{base_url(server)}/scalesim/hints",
                           json={"session": "s", "clock": 0, "seq": 0, "hints": []})
        assert stale.json()["applied"] is True
        stale = httpx.post(f"{base_url(server)}/scalesim/hints",
                           json={"session": "s", "clock": 0, "seq": 0, "hints": []})
        assert stale.json() == {"applied": False, "session": "s", "seq": 0,
                                "reason": "stale seq"}
        bad = httpx.post(f"{base_url(server)}/scalesim/hints", json={"clock": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "seq"
        # A request whose hints are nonsense is still served.
        call(client, "a", extra_body={"scalesim": {"clock": "noon", "next_eta": [1]}})


def adapters_only(device_bytes: int | None = None) -> dict:
    """Agents with an adapter each (host copies: a prefetch may move them) and no prefix KV."""
    config = modeled("scalesim", device_bytes)
    config["runtime"]["modeled"] = {**config["runtime"]["modeled"], "lora_rank": 8,
                                    "managed": ["adapter"]}
    return config


def test_a_hint_prefetches_an_idle_agents_evicted_memory():
    with running_server(adapters_only()) as probe:
        call(openai.OpenAI(base_url=base_url(probe), api_key="-"), "a")
        size = probe.engine.memory.objects["adapter:a"].nbytes
    with running_server(adapters_only(device_bytes=2 * size + size // 2)) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        for agent in ("a", "b", "c"):  # no hints: c's call evicts a (least recently used)
            call(client, agent)
        memory = server.engine.memory

        def placed() -> set[str]:
            return server.loop.call(lambda: set(memory.resident) | set(memory.inflight)).result(5)
        assert "adapter:a" not in placed()
        r = httpx.post(f"{base_url(server)}/scalesim/hints", json={
            "session": "sim", "clock": 0.0, "seq": 1, "hints": [{"agent": "a", "eta": 5.0}]})
        assert r.json()["applied"] is True
        # The engine thread prefetches after the commands it took in one batch; a query sent
        # right behind the hint can run in that batch, before the prefetch. Wait for it a while.
        deadline = time.monotonic() + 5
        while "adapter:a" not in placed() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "adapter:a" in placed()  # on its way back before a calls again
