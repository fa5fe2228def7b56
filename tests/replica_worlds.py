"""Small worlds for the engine-replica tests: placed agents, and a replica that dies mid-run."""

from __future__ import annotations

import time

from runtime import RequestError
from scalesim import Agent, World


class Caller(Agent):
    """Calls once per time unit; a failed call is noted and the agent goes on."""

    def __init__(self, name: str, rounds: int) -> None:
        super().__init__(name, persona=f"You are {name}.")
        self.rounds = rounds
        self.errors: list[str] = []

    def run(self):
        for i in range(self.rounds):
            yield self.wait(1)
            try:
                yield self.llm(f"round {i}", max_tokens=4)
            except RequestError as exc:
                self.errors.append(str(exc))


class Callers(World):
    """``agents`` callers; ``place`` puts every agent on that replica instead of its hash."""

    def setup(self, agents: int = 6, rounds: int = 3, place: int | None = None) -> None:
        for i in range(agents):
            agent = self.add(Caller(f"c{i}", rounds))
            if place is not None:
                self.place(agent, place)

    def metrics(self):
        return {"agent_errors": sum(len(a.errors) for a in self.agents.values())}


class KillsReplica(Callers):
    """Callers, and at ``kill_at`` the Ray actor of replica ``replica`` is killed."""

    def setup(self, agents: int = 6, rounds: int = 4, kill_at: float = 1.5,
              replica: int = 1) -> None:
        super().setup(agents=agents, rounds=rounds)
        self.env.process(self._kill(kill_at, replica))

    def _kill(self, at: float, replica: int):
        import ray

        yield self.env.timeout(at)
        actor = self.env.engine.cluster.actors[replica]
        ray.kill(actor)
        # ray.kill does not wait: make sure the actor is gone before the next engine iteration.
        for _ in range(100):
            try:
                ray.get(actor.describe.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"replica {replica} did not die")
