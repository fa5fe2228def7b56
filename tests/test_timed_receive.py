"""TimedReceive keeps the event order of the process it replaced, event for event.

The reference is ``receive(timeout=...)`` as it was written before: a process that yields
``inbox.get() | env.timeout(timeout)``. Both run the same random scenario (agents that receive
with deadlines, sleep, and send to each other at once or after a delay, messages landing exactly
on deadlines, zero timeouts, messages already waiting); every resumption, with its time and
value, must come in the same order.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Generator

import simpy

from scalesim.timed_receive import TimedReceive


def process_receive(env: simpy.Environment, inbox: simpy.Store,
                    timeout: float) -> simpy.Event:
    def within() -> Generator[simpy.Event, Any, Any]:
        get = inbox.get()
        fired = yield get | env.timeout(timeout)
        if get in fired:
            return fired[get]
        get.cancel()
        return None

    return env.process(within())


def scenario(receive: Callable[[simpy.Environment, simpy.Store, float], simpy.Event],
             seed: int) -> list[tuple[float, int, str, Any]]:
    env = simpy.Environment()
    rng = random.Random(seed)
    n = 6
    inboxes = [simpy.Store(env) for _ in range(n)]
    log: list[tuple[float, int, str, Any]] = []
    sent = iter(range(10**9))

    def send(to: int, delay: int) -> None:
        message = next(sent)
        if delay == 0:
            inboxes[to].put(message)
        else:
            env.timeout(delay).callbacks.append(lambda _: inboxes[to].put(message))

    def agent(i: int) -> Generator[simpy.Event, Any, None]:
        for _ in range(40):
            action = rng.random()
            if action < 0.6:  # integer times: deadlines and arrivals coincide often
                message = yield receive(env, inboxes[i], rng.choice([0, 1, 2, 3]))
                log.append((env.now, i, "received", message))
            elif action < 0.8:
                yield env.timeout(rng.choice([0, 1, 2]))
                log.append((env.now, i, "slept", None))
            for _ in range(rng.choice([0, 0, 1, 2])):
                send(rng.randrange(n), rng.choice([0, 0, 1, 2]))

    for i in range(n):
        env.process(agent(i))
    env.run()
    return log


def test_timed_receive_resumes_agents_in_the_order_the_process_did():
    for seed in range(40):
        expected = scenario(process_receive, seed)
        assert scenario(TimedReceive, seed) == expected, seed
        assert any(entry[2] == "received" and entry[3] is not None for entry in expected)
