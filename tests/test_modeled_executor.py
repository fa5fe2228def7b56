"""The modeled executor: no tensors, virtual time, the real scheduler and memory manager."""

import pytest

from runtime import build_engine
from runtime.executors.modeled import FILLER, LengthChat
from runtime.interface import StepTimed
from runtime.memory import FutureSequence
from runtime.request import Request, SamplingParams


def build_modeled_engine(**options):
    """A modeled engine; like the experiments, no host tier unless asked (a miss re-prefills)."""
    options.setdefault("host_bytes", 0)
    return build_engine("modeled", **options)


def _serve(engine, agents, rounds=1, prefix="persona " * 50, max_tokens=16):
    done = []
    for _ in range(rounds):
        for a in agents:  # each agent its own persona (equal texts would share their KV)
            engine.submit(Request(a, "what now? " * 10, prefix=f"{a} -- {prefix}",
                                  sampling=SamplingParams(max_tokens=max_tokens)))
        while engine.has_work():
            done += engine.step().finished
    return done


def test_length_chat_keeps_the_prefix_stable_and_decodes_placeholders():
    chat = LengthChat(chars_per_token=4, replies=("post", "reply"))
    p1, q1 = chat.encode("x" * 40, "hello")
    p2, q2 = chat.encode("x" * 40, "something else entirely")
    assert p1 == p2 and len(p1) == 5 + 10
    assert len(q2) > len(q1)
    assert chat.decode([FILLER + 1]) == "reply" and chat.decode([]) == ""
    assert len(LengthChat(prefix_tokens=2048).encode("short", "p")[0]) == 2048


def test_calls_complete_with_the_modeled_output_length_and_time_advances():
    engine = build_modeled_engine(model="qwen2.5-7b", hardware_profile="H100", output_tokens=5)
    done = _serve(engine, ["a", "b", "c"], max_tokens=16)
    assert [c.ok for c in done] == [True] * 3
    assert all(c.output_tokens == 5 and c.finish_reason == "stop" for c in done)
    ex = engine.executor
    assert ex.now > 0 and ex.clock.compute == pytest.approx(ex.now - ex.clock.stall)
    assert engine.report()["modeled"]["modeled"] is True


def test_infinite_budget_reuses_prefix_kv_and_lru_under_pressure_stalls():
    agents = [f"a{i}" for i in range(12)]
    opts = dict(model="qwen2.5-7b", hardware_profile="H100", lora_rank=16, output_tokens=4,
                max_num_seqs=4)
    inf = build_modeled_engine(policy="infinite", **opts)
    second = _serve(inf, agents, rounds=2)[12:]
    assert all(c.cached_tokens > 0 for c in second)  # prefix KV kept: not recomputed
    per_agent = inf.executor.cost.lora_bytes(16) + 60 * inf.executor.cost.kv_bytes_per_token
    tight = build_modeled_engine(policy="lru", device_bytes=5 * per_agent, **opts)
    _serve(tight, agents, rounds=2)
    assert tight.executor.memory.totals.evictions > 0
    assert tight.executor.clock.stall > inf.executor.clock.stall
    tight.executor.memory.check()


def test_a_recorded_future_lets_belady_prefetch_and_beat_lru():
    agents = [f"a{i}" for i in range(10)]
    order = agents * 3
    opts = dict(model="qwen2.5-7b", hardware_profile="H100", lora_rank=64, output_tokens=8,
                max_num_seqs=2)
    one = build_modeled_engine(policy="lru", **opts).executor.cost.lora_bytes(64)
    results = {}
    for policy in ("lru", "belady"):
        engine = build_modeled_engine(policy=policy, device_bytes=int(4.5 * one),
                                      managed=("adapter",), **opts)
        if policy == "belady":
            future = FutureSequence(order)
            engine.memory.use_distance(future)
        for a in order:
            if policy == "belady":
                future.on_submit(a)
            engine.submit(Request(a, "hi", sampling=SamplingParams(max_tokens=8)))
            while engine.has_work():
                for c in engine.step().finished:
                    if policy == "belady":
                        future.on_finish(c.agent_id)
        results[policy] = engine.executor
    assert results["belady"].memory.totals.bytes_prefetched > 0
    assert results["belady"].clock.stall < results["lru"].clock.stall


def test_a_request_that_cannot_fit_the_pool_fails_alone():
    engine = build_modeled_engine(model="smollm2-135m", hardware_profile="cpu",
                                  kv_cache_tokens=256, block_size=16)
    bad = engine.submit(Request("a", "word " * 2000, sampling=SamplingParams(max_tokens=8)))
    good = engine.submit(Request("b", "hi", sampling=SamplingParams(max_tokens=8)))
    done = {c.request_id: c for c in _drain(engine)}
    assert not done[bad].ok and "KV blocks" in done[bad].error
    assert done[good].ok


def _drain(engine):
    out = []
    while engine.has_work():
        out += engine.step().finished
    return out


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="managed memory kind"):
        build_modeled_engine(managed=("weights",))
    with pytest.raises(KeyError, match="unknown hardware profile"):
        build_modeled_engine(hardware_profile="TPU")


def test_memory_goes_through_the_engine_once_per_request():
    """One path: the engine acquires each request's objects once and releases them at the end."""
    engine = build_modeled_engine(model="qwen2.5-7b", hardware_profile="H100", lora_rank=16,
                                  output_tokens=6, max_num_seqs=3)
    memory = engine.executor.memory
    assert engine.memory is memory
    done = _serve(engine, [f"a{i}" for i in range(5)], rounds=2)
    assert len(done) == 10 and all(c.ok for c in done)
    # Each request accounts once for its adapter and once for its prefix (one verdict however
    # many cached segments it spans), and the manager counted no access that is not some
    # request's: no double acquire.
    first, second = done[:5], done[5:]
    assert all(c.memory.misses == {"adapter": 1, "prefix_kv": 1} and not c.memory.hits
               for c in first)
    assert all(c.memory.hits == {"adapter": 1, "prefix_kv": 1} and not c.memory.misses
               for c in second)
    accesses = [sum(c.memory.hits.values()) + sum(c.memory.misses.values()) for c in done]
    assert memory.totals.hits + memory.totals.misses == sum(accesses)
    assert all(memory.held_by(c.request_id) == [] for c in done)
    assert all(o.pins == 0 for o in memory.objects.values())
    assert [c.cached_tokens > 0 for c in done] == [False] * 5 + [True] * 5
    memory.check()


@pytest.mark.parametrize("policy", ["lru", "infinite"])
def test_taking_decode_steps_at_once_changes_nothing_without_prefetch(policy):
    """Multi-step decodes give the same modeled time, steps and outputs as stepping one by one."""
    opts = dict(model="qwen2.5-7b", hardware_profile="H100", lora_rank=16, output_tokens=7,
                max_num_seqs=4, policy=policy)
    agents = [f"a{i}" for i in range(9)]
    per_agent = None
    results = []
    for fused in (True, False):
        if policy == "lru":
            probe = build_modeled_engine(**opts).executor
            per_agent = probe.cost.lora_bytes(16) + 60 * probe.cost.kv_bytes_per_token
        engine = build_modeled_engine(device_bytes=per_agent and 5 * per_agent,
                                      decode_runs=fused, **opts)
        calls: list[StepTimed] = []  # one per executor call
        engine.listen(lambda event, calls=calls: isinstance(event, StepTimed)
                      and calls.append(event))
        done = _serve(engine, agents, rounds=2)
        ex = engine.executor
        results.append((ex.now, ex.clock.stall, ex.steps, ex.tokens_computed,
                        [(c.request_id, c.text, c.output_tokens) for c in done], len(calls)))
    (t1, s1, n1, k1, d1, c1), (t2, s2, n2, k2, d2, c2) = results
    assert c1 < c2 == n2  # fewer engine iterations, as many modeled steps
    assert t1 == pytest.approx(t2, rel=1e-12) and s1 == pytest.approx(s2, abs=1e-12)
    assert (n1, k1) == (n2, k2) and sorted(d1) == sorted(d2)


class _WordChat:
    """Stands in for the real chat template: one token per word."""

    def encode(self, prefix, prompt, history=()):
        return [7] * len(prefix.split()), [8] * len(prompt.split())


def test_replay_answers_each_agents_calls_with_its_recorded_replies_in_order():
    import pandas as pd

    from runtime.executors.modeled import ReplayChat

    trace = pd.DataFrame({"request_id": [3, 0, 1, 2], "agent": ["a", "a", "b", "a"],
                          "completion": ["third", "first", "hi b", "second"],
                          "output_tokens": [2, 5, 3, 1],
                          "finish_reason": ["stop", "stop", "stop", "length"]})
    engine = build_modeled_engine(model="smollm2-135m", hardware_profile="cpu", lora_rank=0,
                                  managed=("prefix_kv",), chat=ReplayChat(_WordChat(), trace))
    first = _serve(engine, ["a", "b"], prefix="one two three")
    assert sorted((c.agent_id, c.text, c.output_tokens) for c in first) == [("a", "first", 5),
                                                                           ("b", "hi b", 3)]
    assert first[0].prompt_tokens == 5 + 20  # the chat's tokens: prefix ("a -- one two three") + prompt words
    second = _serve(engine, ["a"], prefix="one two three", max_tokens=1)  # cut at the limit
    third = _serve(engine, ["a"], prefix="one two three")  # ended by end-of-sequence
    assert [(c.text, c.output_tokens, c.finish_reason) for c in second + third] == [
        ("second", 1, "length"), ("third", 2, "stop")]
    extra = _serve(engine, ["b"], prefix="one two three")  # b made one call when recorded
    assert not extra[0].ok and "more calls than it made in the recorded run" in extra[0].error


def test_a_host_tier_turns_prefix_misses_into_copies_instead_of_prefills():
    agents = [f"a{i}" for i in range(8)]
    opts = dict(model="qwen2.5-7b", hardware_profile="H100", output_tokens=4, max_num_seqs=2,
                managed=("prefix_kv",), policy="lru")
    per_agent = build_modeled_engine(**opts).executor.cost.kv_bytes_per_token * 100
    runs = {}
    for host in (0, None):
        engine = build_modeled_engine(device_bytes=3 * per_agent, host_bytes=host, **opts)
        done = _serve(engine, agents, rounds=2)
        assert all(c.ok for c in done)
        runs[host] = engine.executor
        engine.executor.memory.check()
    dropped, kept = runs[0], runs[None]
    assert dropped.memory.host_used == 0 and kept.memory.host_used > 0
    # The second round re-prefills every evicted persona without a host tier, copies it with one.
    assert kept.tokens_computed < dropped.tokens_computed
    assert kept.memory.totals.bytes_on_demand > 0


def test_a_persona_that_changes_is_a_new_branch_and_the_old_one_stays_usable():
    """A changed persona shares the tree only up to where its tokens change; the old persona's
    segment moves to the host tier and serves the agent again when it goes back to it."""
    opts = dict(model="qwen2.5-7b", hardware_profile="H100", output_tokens=2, max_num_seqs=1,
                managed=("prefix_kv",), policy="lru", host_bytes=None)
    per_agent = build_modeled_engine(**opts).executor.cost.kv_bytes_per_token * 150
    engine = build_modeled_engine(device_bytes=int(1.6 * per_agent), **opts)
    memory, tree = engine.memory, engine.executor.prefixes
    first = _serve(engine, ["ann"], prefix="persona " * 50)
    _serve(engine, ["bob"], prefix="persona " * 50)  # pushes ann's segments to the host
    assert memory.host_used > 0
    changed = _serve(engine, ["ann"], prefix="other words " * 40)
    back = _serve(engine, ["ann"], prefix="persona " * 50)
    assert first[0].cached_tokens == 0 and changed[0].cached_tokens == 0
    # It came back as a copy from the host: reused, and (a load) a miss.
    assert back[0].ok and back[0].cached_tokens > 0 and back[0].memory.misses == {"prefix_kv": 1}
    assert memory.totals.bytes_on_demand > 0  # it came back from the host
    assert memory.host_used == sum(o.nbytes for o in memory.objects.values()
                                   if o.host is not None)
    memory.check()
    tree.check()
