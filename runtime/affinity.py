"""Agent affinity: which engine replica is an agent's home.

Every agent has one *home* replica, where all of its calls run and all of its memory objects
(adapter, persona prefix KV) live, so that nothing of one agent is duplicated across replicas.
By default the home is a stable hash of the agent id (BLAKE2b, the same in every process and on
every run, unlike Python's salted ``hash``; not CRC-32, whose low bits repeat for names that
differ in one character, such as ``user1`` and ``user3``). A world may place agents itself (to keep agents
that share a prefix together, say) with :meth:`Affinity.place`.

When a replica dies and the run goes on (``on_replica_failure: continue``), the agents homed
there move, again by a stable hash, to one of the live replicas: :meth:`Affinity.fail_over`.
"""

from __future__ import annotations

import hashlib


def stable_hash(agent_id: str) -> int:
    """A hash of ``agent_id`` that does not change between processes or runs."""
    digest = hashlib.blake2b(agent_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Affinity:
    """The home replica of every agent among ``replicas`` replicas."""

    def __init__(self, replicas: int) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self.live: list[int] = list(range(replicas))
        self._placed: dict[str, int] = {}
        self._homes: dict[str, int] = {}
        #: agents whose home replica died and who moved to a live one
        self.moved: set[str] = set()

    def place(self, agent_id: str, replica: int) -> None:
        """Make ``replica`` the home of ``agent_id`` (before its first call, to keep its memory
        in one place)."""
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica {replica} out of range: there are {self.replicas}")
        self._placed[agent_id] = replica
        self._homes.pop(agent_id, None)

    def home(self, agent_id: str) -> int:
        """The replica ``agent_id``'s calls go to."""
        home = self._homes.get(agent_id)
        if home is None:
            home = self._placed.get(agent_id)
            if home is None:
                home = stable_hash(agent_id) % self.replicas
            if home not in self.live:
                home = self.live[stable_hash(agent_id) % len(self.live)]
                self.moved.add(agent_id)
            self._homes[agent_id] = home
        return home

    def fail_over(self, dead: int) -> None:
        """Replica ``dead`` is gone: its agents get a live home at their next call."""
        if dead in self.live:
            self.live.remove(dead)
        if not self.live:
            raise ValueError("no live replica left")
        self._homes = {a: r for a, r in self._homes.items() if r != dead}
