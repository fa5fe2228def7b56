"""Worlds: the container of a simulation's agents, places and interaction graph.

A world author subclasses :class:`World` and builds everything in :meth:`World.setup`, whose
keyword arguments are the ``world.params`` of the run's YAML file::

    class Town(World):
        def setup(self, villagers: int = 8):
            for i in range(villagers):
                self.add(Villager(f"v{i}", persona="..."))

The world owns the run's seeded random generator (:attr:`World.random`) and a networkx
:class:`~networkx.DiGraph` of agents (:attr:`World.graph`) on which every message is recorded.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from typing import Any, Iterable, TypeVar

import networkx as nx

from scalesim.agent import Agent
from scalesim.environment import SimEnvironment

A = TypeVar("A", bound=Agent)


class World:
    """Base class of every simulated world."""

    def __init__(self, env: SimEnvironment, seed: int = 0) -> None:
        self.env = env
        self.seed = seed
        self.random = random.Random(seed)
        self.graph = nx.DiGraph()
        env.observer.use_graph(self.graph)  # the oracle estimates receivers from their senders
        self.agents: dict[str, Agent] = {}
        #: ``(agent name, error text)`` of agents stopped by a failed LLM request.
        self.failures: list[tuple[str, str]] = []

    @property
    def now(self) -> float:
        return self.env.now

    # ``*args`` too: a type checker then accepts an override with any named parameters.
    def setup(self, *args: Any, **params: Any) -> None:
        """Create the agents (override). Keyword arguments come from ``world.params``."""

    @classmethod
    def parameters(cls) -> dict[str, inspect.Parameter]:
        """The keyword parameters :meth:`setup` accepts, by name."""
        params = inspect.signature(cls.setup).parameters
        return {n: p for n, p in params.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @classmethod
    def adapters(cls, **params: Any) -> Iterable[str]:
        """The LoRA adapter paths :meth:`setup` will give its agents, for these ``world.params``.

        Override it in a world whose agents have adapters: a run checks every declared adapter
        against the model before the model loads (a problem is one line naming the file, exit 2)
        instead of failing each of its calls. ``params`` are ``setup``'s keywords with its
        defaults filled in; accept ``**params`` for those the declaration does not need.
        """
        return ()

    def add(self, agent: A) -> A:
        """Put ``agent`` into the world and start its process."""
        if agent.name in self.agents:
            raise ValueError(f"an agent named {agent.name!r} already exists")
        self.agents[agent.name] = agent
        self.graph.add_node(agent.name)
        agent._start(self)
        return agent

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise KeyError(f"no agent named {name!r}") from None

    #: how long a message takes when its sender names no delay (see :meth:`message_delay`)
    default_message_delay: float = 0.0

    def message_delay(self, sender: Agent, recipient: Agent) -> float:
        """How long a message from ``sender`` to ``recipient`` travels when :meth:`Agent.send`
        names no delay: :attr:`default_message_delay`; override for delays per edge."""
        return self.default_message_delay

    def record_interaction(self, sender: str, recipient: str) -> None:
        """Count one message from ``sender`` to ``recipient`` on the interaction graph."""
        if self.graph.has_edge(sender, recipient):
            self.graph[sender][recipient]["messages"] = (
                self.graph[sender][recipient].get("messages", 0) + 1
            )
        else:
            self.graph.add_edge(sender, recipient, messages=1)

    def hint(self, agent: Agent | str, eta: float) -> None:
        """Tell the distance oracle that ``agent`` will call the LLM in about ``eta`` sim time.

        For what only the world author knows (a scheduled meeting, a message about to arrive).
        The hint lasts until the agent's next call; without an oracle it is ignored.
        """
        self.env.observer.hint(agent if isinstance(agent, str) else agent.name, self.now + eta)

    def place(self, agent: Agent | str, replica: int) -> None:
        """Make engine replica ``replica`` the home of ``agent`` (``runtime.replicas`` > 1).

        By default an agent's home is a stable hash of its name; placing agents that share a
        prefix on one replica keeps that prefix in one place. With one engine it is ignored.
        """
        self.env.place(agent if isinstance(agent, str) else agent.name, replica)

    def record_failure(self, agent: Agent, error: Exception) -> None:
        self.failures.append((agent.name, str(error)))

    def counters(self) -> dict[str, int]:
        """The agents' counters (:meth:`Agent.count`: ``parse_fallbacks``, ``reflections``, a
        world's own), summed over agents; the run's summary carries them beside
        :meth:`metrics`, so a world need not report them."""
        total: Counter[str] = Counter()
        for agent in self.agents.values():
            total.update(agent.counters)
        return dict(sorted(total.items()))

    def metrics(self) -> dict[str, Any]:
        """World-specific numbers for ``summary.json`` (override to add your own; the agents'
        :meth:`counters` are added to them)."""
        return {"agents": len(self.agents), "failed_agents": len(self.failures),
                "interactions": int(self.graph.size(weight="messages"))}
