"""The engine's submission path on a fake executor: validation, rejection, one call each."""

from __future__ import annotations

from conftest import EchoExecutor

from runtime import Request, SamplingParams, build_engine


def test_an_executor_rejection_fails_only_that_request_and_each_is_validated_once():
    executor = EchoExecutor()
    engine = build_engine(executor)
    ids = [engine.submit(Request(a, p, sampling=SamplingParams(max_tokens=32)))
           for a, p in [("ann", "hi"), ("bob", "REJECT this"), ("cy", "yo")]]
    done = {}
    while engine.has_work():
        done.update({c.request_id: c for c in engine.step().finished})
    assert executor.validated == ids
    assert done[ids[1]].finish_reason == "error" and "rejects it" in done[ids[1]].error
    assert done[ids[0]].text == "ann:hi" and done[ids[2]].text == "cy:yo"
    assert all(ids[1] not in batch for batch in executor.batches)  # never reached execute
