"""The server under load: many concurrent clients, an over-full queue, clients that leave.

A bounded loopback load test: concurrent simulated agents (async ``openai`` clients) each make a
few requests; every request must be answered exactly once, with its own reply, and none with a
5xx. It prints p50 / p99 latency and output tokens per second, *of the modeled executor paced
in wall time* (``serve.pace``), which says how the server behaves, not how fast a model is.
With a queue bound of four, a burst gets 429s with ``Retry-After`` and the server stays
healthy. A client that disconnects cancels its request, which frees its memory and KV blocks.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest
import openai

from serve_harness import MODELED, base_url, running_server

AGENTS, CALLS = 48, 4


def paced(pace: float, **runtime) -> dict:
    rt = {**MODELED["runtime"], **runtime}
    return {"runtime": rt, "serve": {"port": 0, "pace": pace}}


def metric(server, name: str) -> float:
    text = httpx.get(f"{base_url(server)[:-3]}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_concurrent_agents_each_answered_exactly_once():
    with running_server(paced(2.0)) as server:
        async def agent(client: openai.AsyncOpenAI, i: int) -> list[tuple[str, float, int]]:
            out = []
            for j in range(CALLS):
                start = time.perf_counter()
                raw = await client.chat.completions.with_raw_response.create(
                    model="smollm2-135m", max_tokens=16,
                    messages=[{"role": "system", "content": f"You are villager {i}."},
                              {"role": "user", "content": f"call {j} of villager {i}"}],
                    extra_body={"scalesim": {"agent": f"villager-{i}", "clock": float(j),
                                             "next_eta": float(j + 1)}})
                reply = raw.parse()
                assert raw.headers["x-scalesim-agent"] == f"villager-{i}"
                out.append((raw.headers["x-request-id"], time.perf_counter() - start,
                            reply.usage.completion_tokens))
            return out

        async def main() -> tuple[list[tuple[str, float, int]], float]:
            client = openai.AsyncOpenAI(base_url=base_url(server), api_key="-", max_retries=0)
            start = time.perf_counter()
            results = await asyncio.gather(*[agent(client, i) for i in range(AGENTS)])
            wall = time.perf_counter() - start
            await client.close()
            return [r for rs in results for r in rs], wall

        results, wall = asyncio.run(main())
        ids = [r[0] for r in results]
        assert len(ids) == AGENTS * CALLS and len(set(ids)) == len(ids)
        latencies = sorted(r[1] for r in results)
        tokens = sum(r[2] for r in results)
        p50 = statistics.median(latencies)
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        print(f"\nload (modeled executor, pace 2.0): {len(ids)} requests from {AGENTS} agents, "
              f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"{tokens / wall:.0f} output tokens/s, {len(ids) / wall:.1f} requests/s")
        assert metric(server, 'scalesim_requests_total{endpoint="chat",outcome="ok"}') == len(ids)
        assert metric(server, "scalesim_batch_size_max") >= 2  # clients were batched together
        assert server.loop.pending == 0 and not server.engine.has_work()


def test_overfull_queue_gets_429_and_the_server_stays_healthy():
    config = paced(40.0)
    config["serve"]["max_pending"] = 4
    with running_server(config) as server:
        url = f"{base_url(server)}/chat/completions"

        async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post(url, json={
                "model": "smollm2-135m", "user": f"burst-{i}",
                "messages": [{"role": "user", "content": f"burst {i}"}]})

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*[one(client, i) for i in range(16)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 4 and codes.count(429) >= 1
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(f"{base_url(server)[:-3]}/health").json()["status"] == "ok"
        again = httpx.post(url, timeout=60, json={"model": "smollm2-135m",
                                                  "messages": [{"role": "user", "content": "ok?"}]})
        assert again.status_code == 200
        assert metric(server, "scalesim_rejected_queue_full_total") == codes.count(429)


def test_disconnected_clients_are_cancelled_and_their_memory_freed():
    # One sequence at a time and slow steps: a request waits behind another, or runs long.
    with running_server(paced(100.0, max_num_seqs=1)) as server:
        url = f"{base_url(server)}/chat/completions"

        def body(agent: str, **extra) -> dict:
            return {"model": "smollm2-135m", "user": agent, **extra,
                    "messages": [{"role": "system", "content": f"You are {agent}."},
                                 {"role": "user", "content": "Take your time."}]}

        served: list[int] = []
        first = threading.Thread(target=lambda: served.append(
            httpx.post(url, json=body("patient"), timeout=60).status_code))
        first.start()
        time.sleep(0.3)
        with pytest.raises(httpx.TimeoutException):  # waits behind "patient", then gives up
            httpx.post(url, json=body("impatient"), timeout=0.5)
        with httpx.stream("POST", url, json=body("streamer", stream=True), timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the role chunk; then the client leaves
        first.join(60)
        assert served == [200]
        deadline = time.monotonic() + 20
        while (server.loop.pending or server.engine.has_work()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.loop.metrics.cancelled == 2
        assert server.loop.pending == 0 and not server.engine.has_work()
        memory = server.engine.memory
        assert all(obj.pins == 0 for obj in memory.objects.values())
        cache = server.engine.scheduler.cache  # free but for the prefix cache's blocks
        cached = {b for seg in server.engine.executor.prefixes.segments() for b in seg.blocks}
        assert cache.num_free == cache.num_blocks - len(cached)
        outcomes = server.loop.metrics.requests
        assert outcomes[("chat", "cancelled")] == 2 and outcomes[("chat", "ok")] == 1, outcomes
