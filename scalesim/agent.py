"""Agents: simpy processes that think with the LLM.

A world author subclasses :class:`Agent` and writes :meth:`Agent.run` as a generator, yielding on
what the agent waits for::

    class Villager(Agent["Town"]):
        def run(self):
            while True:
                yield self.wait(60)
                reply = yield self.llm("What do you do now?", max_tokens=32)
                self.send(self.world.mayor, reply.text)

The world class in brackets is what :attr:`Agent.world` is typed as, so that a type checker
knows the world's own attributes (``self.world.mayor``); a plain ``Agent`` works too, with the
world untyped.

``llm()`` returns the :class:`~runtime.Completion` (text and token counts), ``wait()`` passes
simulated time, ``wait_for()`` waits for an event for at most a given time, and ``send()``/``receive()`` exchange messages and record the interaction on the
world's graph.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Generic, TypeVar, Union, cast

import simpy

from runtime import Constraint, Request, RequestError, SamplingParams
from runtime.constrained import checked
from scalesim.environment import LLMCall, SimEnvironment
from scalesim.timed_receive import TimedReceive

if TYPE_CHECKING:
    from scalesim.world import World

#: The world class an agent lives in: ``class Villager(Agent["Town"])`` types ``self.world``.
W = TypeVar("W", bound="World")

#: An earlier turn of a conversation: ``(role, content)``, or a message dict with ``role`` and
#: ``content`` (and optionally ``name``, ``tool_calls``, ``tool_call_id``).
HistoryTurn = Union[tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True)
class Message:
    """What :meth:`Agent.send` delivers and :meth:`Agent.receive` returns: sent at ``time``,
    in the recipient's inbox from ``arrival`` (``None``: at once)."""

    sender: str
    recipient: str
    content: Any
    time: float
    arrival: float | None = None


class Agent(Generic[W]):
    """Base class of every simulated agent.

    ``persona`` is the agent's stable prefix (the system turn of every call it makes; its KV can be
    kept between calls) and ``adapter`` the path of its own LoRA adapter, if any. The type
    parameter is the world class the agent lives in (see :attr:`world`).

    An agent that never asks the LLM (a customer placing orders, a game's moderator, a clock)
    sets :attr:`calls_llm` to False, on its class or itself: it still waits, sends and
    receives, but it has no persona or adapter, the engine never hears of it (it is not
    declared, so nothing of it is prefetched or held in memory) and :meth:`llm` refuses.
    """

    #: whether this agent asks the LLM at all (False: see the class docstring)
    calls_llm: bool = True

    def __init__(self, name: str, persona: str = "", adapter: str | None = None) -> None:
        if not inspect.isgeneratorfunction(type(self).run):
            raise TypeError(f"{type(self).__name__}.run must be a generator (use yield)")
        self.name = name
        self.persona = persona
        self.adapter = adapter
        self._world: W | None = None
        self.inbox: simpy.Store | None = None
        self.process: simpy.Process | None = None
        #: the agent's counts of named events (see :meth:`count`)
        self.counters: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``; the world's counters (the sums over its agents)
        go into the run's summary without the world reporting them (``World.counters``)."""
        self.counters[name] += n

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @property
    def env(self) -> SimEnvironment:
        return self.world.env

    @property
    def world(self) -> W:
        """The world the agent lives in, typed as the class in ``Agent[...]``."""
        if self._world is None:
            raise RuntimeError(f"agent {self.name!r} is not part of a world yet (World.add)")
        return self._world

    @property
    def home(self) -> W:
        """The same as :attr:`world` (the older name)."""
        return self.world

    @property
    def in_world(self) -> bool:
        """Whether :meth:`World.add` has put the agent into a world yet."""
        return self._world is not None

    @property
    def now(self) -> float:
        return self.env.now

    @property
    def mailbox(self) -> simpy.Store:
        """The agent's inbox of :class:`Message` objects."""
        if self.inbox is None:
            raise RuntimeError(f"agent {self.name!r} is not part of a world yet (World.add)")
        return self.inbox

    def run(self) -> Generator[simpy.Event, Any, None]:
        """The agent's life: override as a generator that yields events."""
        raise NotImplementedError
        yield  # pragma: no cover - makes this a generator function

    def _start(self, world: World) -> None:
        # World.add takes any agent, so it cannot check W; ``Agent["Town"]`` is the author's word
        # that this agent is only ever added to a Town.
        self._world = cast(W, world)
        if not self.calls_llm:
            world.env.observer.never_calls(self.name)
        self.inbox = simpy.Store(world.env)
        self.process = world.env.process(self._live())

    def _live(self) -> Generator[simpy.Event, Any, None]:
        # A failed LLM request ends this agent only; the world and the other agents go on.
        try:
            yield from self.run()
        except RequestError as exc:
            self.world.record_failure(self, exc)
        finally:
            self.env.observer.on_exit(self.name)

    def llm(
        self,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: tuple[str, ...] | list[str] = (),
        seed: int | None = None,
        history: Iterable[HistoryTurn] = (),
        duration: float | None = None,
        schema: Any = None,
        choices: Sequence[str] | None = None,
        constraint: Constraint | None = None,
    ) -> LLMCall:
        """Ask the LLM; yield the returned event to get the :class:`~runtime.Completion`.

        The agent gets it ``duration`` units of simulated time after it asked (default: the
        world's ``sim.call_duration``, 0 unless configured): it is busy thinking meanwhile,
        while the clock and the other agents go on. Whatever it sends after the call, it sends
        then. A duration lets the engine batch the calls of many instants together; the reply
        itself does not depend on it. A negative duration raises :class:`ValueError`.

        ``history`` is the conversation so far, oldest first, as ``(role, content)`` pairs
        (roles ``user``, ``assistant``, ``tool``) or message dicts: it is rendered between the
        persona's system turn and ``prompt`` with the model's chat template. An agent that
        keeps a running conversation sends it whole every time, its last exchange included;
        the engine then finds the tokens of its previous call at the start of this one and
        reuses their KV instead of computing them again::

            chat: list[tuple[str, str]] = []
            for question in questions:
                reply = yield self.llm(question, history=chat, max_tokens=48)
                chat += [("user", question), ("assistant", reply.text)]

        The trace records ``prompt`` (the new user turn) alone; ``prompt_tokens`` counts the
        history too.

        ``schema`` (a JSON schema dict or a pydantic model class) holds the reply to JSON that
        is an instance of it, ``choices`` to exactly one of the given strings: tokens outside
        the grammar are masked before sampling, so the reply parses unless ``max_tokens`` cuts
        it (``finish_reason`` ``"length"``); give room::

            reply = yield self.llm("Your plan, as JSON.", schema=Plan, max_tokens=96)
            plan = Plan.model_validate_json(reply.text)

        Both need an executor that samples real tokens (``torch``, ``hf``); the modeled one
        fails such a call (:class:`~runtime.RequestError` on the completion). An invalid
        schema raises :class:`~runtime.ConstraintError` here. ``constraint`` takes any
        :class:`~runtime.Constraint` instead (a regular expression, a tool call; or one with
        ``required=False``, which an executor without real tokens answers unconstrained, as
        ``LLMAgent.choose`` does).
        """
        if not self.calls_llm:
            raise RuntimeError(f"agent {self.name!r} asked the LLM, but its calls_llm is False "
                               f"({type(self).__name__})")
        if seed is None and temperature > 0:
            seed = self.world.random.getrandbits(31)
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=tuple(stop),
        )
        turns = tuple({"role": t[0], "content": t[1]} if isinstance(t, tuple) else dict(t)
                      for t in history)
        if sum(x is not None for x in (schema, choices, constraint)) > 1:
            raise ValueError("llm(): give one of schema=, choices= and constraint=")
        if constraint is not None:
            constraint = checked(constraint)
        elif schema is not None:
            constraint = checked(Constraint.json_schema(schema))
        elif choices is not None:
            constraint = checked(Constraint.choice(choices))
        request = Request(self.name, prompt, prefix=self.persona, sampling=sampling,
                          adapter=self.adapter, history=turns, constraint=constraint)
        return self.env.submit(self.name, request, duration)

    def wait(self, delay: float, *, label: str | None = None) -> simpy.Timeout:
        """Let ``delay`` units of simulated time pass.

        ``label`` names the kind of wait for the distance oracle, which learns per agent and
        label how often a wake-up from it leads to an LLM call (by default the line of code
        that waits is its name).
        """
        # the wake-up time is exact
        self.env.observer.on_wait(self.name, self.now + delay, label or _site("wait"))
        return self.env.timeout(delay)

    def wait_for(self, event: simpy.Event, timeout: float | None = None, *,
                 label: str | None = None) -> simpy.Event:
        """An event whose value is ``event``'s once it fires, or ``None`` after ``timeout``.

        Use it instead of ``event | self.wait(timeout)``: :meth:`wait`'s wake-up time is exact,
        whereas here ``timeout`` is only an upper bound (the agent usually wakes earlier, when
        ``event`` fires). The distance oracle treats it like :meth:`receive`'s timeout: a deadline,
        refined by the agent's turns, hints and in-neighbours on the interaction graph.
        """
        self.env.observer.on_receive(self.name, self.now + (math.inf if timeout is None
                                                            else timeout),
                                     label or _site("wait_for"))
        if timeout is None:
            return event
        return self.env.process(self._first_of(event, timeout))

    def _first_of(self, event: simpy.Event, timeout: float) -> Generator[simpy.Event, Any, Any]:
        fired = yield event | self.env.timeout(timeout)
        return fired[event] if event in fired else None

    def send(self, recipient: Agent | str, content: Any, *,
             delay: float | None = None) -> Message:
        """Deliver ``content`` to another agent's inbox and record the interaction.

        ``delay``: the message travels that long first (an order shipped for a week, a letter);
        default: the world's :meth:`~scalesim.World.message_delay` for this pair (0: at once).
        A message in transit is an event in the simulation's queue: the recipient gets it on
        arrival, and the distance oracle knows when, as it knows a timer.
        """
        other = self.world.agent(recipient) if isinstance(recipient, str) else recipient
        if delay is None:
            delay = self.world.message_delay(self, other)
        if not isinstance(delay, (int, float)) or not 0 <= delay < math.inf:
            raise ValueError(f"agent {self.name!r}: a message delay must be a finite number "
                             f">= 0, got {delay!r}")
        self.world.record_interaction(self.name, other.name)
        if not delay:
            message = Message(self.name, other.name, content, self.now)
            other.mailbox.put(message)
            return message
        message = Message(self.name, other.name, content, self.now, self.now + delay)
        self.env.observer.on_transit(other.name, self.now + delay)
        def arrive(_: simpy.Event) -> None:
            other.mailbox.put(message)

        self.env.timeout(delay).callbacks.append(arrive)
        return message

    def receive(self, timeout: float | None = None, *,
                label: str | None = None) -> simpy.Event:
        """An event whose value is the next :class:`Message`, or ``None`` after ``timeout``.

        ``label`` names the kind of wait for the distance oracle, as for :meth:`wait`.
        """
        inbox, env = self.mailbox, self.env
        if not inbox.items:
            env.observer.on_receive(self.name, env.now + (math.inf if timeout is None
                                                          else timeout),
                                    label or _site("receive"))
        if timeout is None:
            return inbox.get()
        return TimedReceive(env, inbox, timeout)


def _site(kind: str) -> str:
    """Where the agent waits: the kind of wait and the line of the caller's code that issued it.

    Two frames up is the code that called ``wait``/``receive``/``wait_for``: an agent's
    ``run()`` or a helper of the agents library.
    """
    frame = sys._getframe(2)
    key = (kind, frame.f_code, frame.f_lineno)
    site = _SITES.get(key)
    if site is None:  # made once per line: a wait is the commonest event of a large world
        site = _SITES[key] = f"{kind} {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return site


_SITES: dict[tuple[str, Any, int], str] = {}
