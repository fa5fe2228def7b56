"""``Engine.cancel``, the one runtime change the server needs: a client that leaves frees its
request's memory objects and KV blocks, whether the request was waiting or running."""

from __future__ import annotations

from runtime import Request, SamplingParams, build_engine


def modeled_engine(max_num_seqs: int = 1):
    return build_engine("modeled", model="smollm2-135m", policy="lru", lora_rank=8,
                        max_num_seqs=max_num_seqs, output_tokens=16)


def request(agent: str) -> Request:
    return Request(agent, "What now?", f"You are {agent}.", SamplingParams(max_tokens=16))


def drain(engine) -> list:
    done = []
    while engine.has_work():
        done += engine.step().finished
    return done


def test_cancel_a_waiting_and_a_running_request_frees_everything():
    engine = modeled_engine(max_num_seqs=1)
    running = engine.submit(request("ada"))
    waiting = engine.submit(request("bob"))
    engine.step()  # ada is admitted and prefilled; bob waits for a slot
    assert [s.request_id for s in engine.scheduler.running] == [running]
    assert engine.cancel(waiting, "gone") and engine.cancel(running, "gone too")
    done = {c.request_id: c for c in drain(engine)}
    assert done[waiting].error == "gone" and done[running].error == "gone too"
    assert done[running].finish_reason == "error"
    assert all(obj.pins == 0 for obj in engine.memory.objects.values())
    # Every block is free but those of the prefix cache (what ada computed before she left).
    cache = engine.scheduler.cache
    cached = {b for seg in engine.executor.prefixes.segments() for b in seg.blocks}
    assert cache.num_free == cache.num_blocks - len(cached)
    assert all(cache.refs(b) == 1 for b in cached)
    assert not engine.cancel(running, "again")  # already gone
    assert not engine.cancel(12345, "never submitted")
    # The engine serves the next request as usual.
    engine.submit(request("eve"))
    assert [c.ok for c in drain(engine)] == [True]


def test_cancel_on_the_first_come_first_served_scheduler(echo_engine):
    first = echo_engine.submit(Request("a", "hello", sampling=SamplingParams(max_tokens=4)))
    assert echo_engine.cancel(first, "gone")
    done = drain(echo_engine)
    assert [(c.request_id, c.error) for c in done] == [(first, "gone")]
