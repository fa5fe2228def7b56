"""Waiting for a message with a deadline, without a process: :class:`TimedReceive`.

``Agent.receive(timeout=...)`` is the commonest wait of a large world (a user sleeps in its inbox
until its next active step). Written the simpy way it is a process that yields
``inbox.get() | env.timeout(timeout)``: a :class:`simpy.Process`, its generator, an
:class:`~simpy.events.AnyOf` condition and its value, for every wake-up.

:class:`TimedReceive` is the same wait as one event and a few callbacks. It schedules exactly
the events the process did, at the same moments, so every event keeps its place in the queue
(its time, priority and insertion id) and a run makes the same decisions:

1. a start event at once, urgent, as the process's initialisation was; when it fires, the
   inbox's get request and the deadline's timeout are made;
2. when the first of the two fires, an event at once, as the condition was;
3. when that fires, the :class:`TimedReceive` itself, as the process's end was: its value is
   the message if the get request had fired by then, else ``None`` (the request withdrawn).

Only the objects are lighter. Fewer events would be faster still, but an agent that woke one
or two events earlier would act before agents it acts after now, and draw from a shared random
generator in another order.
"""

from __future__ import annotations

import simpy
from simpy.core import URGENT
from simpy.resources.store import StoreGet


class TimedReceive(simpy.Event):
    """The next message of ``inbox``, or ``None`` once ``timeout`` has passed (see the module
    docstring for why it is built this way)."""

    def __init__(self, env: simpy.Environment, inbox: simpy.Store, timeout: float) -> None:
        super().__init__(env)
        self._inbox = inbox
        self._timeout = timeout
        self._get: StoreGet | None = None
        self._deadline: simpy.Event | None = None
        self._first: simpy.Event | None = None
        start = simpy.Event(env)
        start._ok, start._value = True, None
        start.callbacks.append(self._start)
        env.schedule(start, URGENT)

    def _start(self, _: simpy.Event) -> None:
        """Step 1: make the get request and the timeout, and wait for the first of them."""
        try:
            self._get = get = self._inbox.get()
            self._deadline = deadline = self.env.timeout(self._timeout)
        except Exception as exc:  # a bad timeout: the wait fails, as the process did
            self.fail(exc)
            return
        get.callbacks.append(self._either)
        deadline.callbacks.append(self._either)

    def _either(self, event: simpy.Event) -> None:
        """Step 2: the get request or the timeout fired; the first one schedules the next step."""
        if self._first is not None:
            return
        self._first = first = simpy.Event(self.env)
        first.callbacks.append(self._end)
        if event._ok:
            first.succeed()
        else:
            event._defused = True
            first.fail(event._value)

    def _end(self, first: simpy.Event) -> None:
        """Step 3: this event fires with the message, if the get request fired by now."""
        get, deadline = self._get, self._deadline
        assert get is not None and deadline is not None
        for event in (get, deadline):
            if event.callbacks and self._either in event.callbacks:
                event.callbacks.remove(self._either)
        if not first._ok:
            first._defused = True
            self.fail(first._value)
            return
        if get.callbacks is None:  # fired (processed) before this step
            self.succeed(get._value)
            return
        get.cancel()
        self.succeed(None)
