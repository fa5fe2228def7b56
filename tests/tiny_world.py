"""Small worlds used by the config, CLI and trace tests."""

from __future__ import annotations

from scalesim import Agent, World


class Pinger(Agent):
    def __init__(self, name: str, rounds: int, crash_at: int | None,
                 reword_from: int | None = None, temperature: float = 0.0) -> None:
        super().__init__(name, persona=f"You are {name}.")
        self.rounds = rounds
        self.crash_at = crash_at
        self.reword_from = reword_from
        self.temperature = temperature

    def run(self):
        for i in range(self.rounds):
            if i == self.crash_at:
                raise RuntimeError(f"{self.name} crashed in round {i}")
            yield self.wait(1)
            reworded = self.reword_from is not None and i >= self.reword_from
            yield self.llm(f"round {i}" + (", reworded" if reworded else ""), max_tokens=4,
                           temperature=self.temperature)


class Pingers(World):
    """``agents`` agents each make ``rounds`` calls, one per time unit."""

    def setup(self, agents: int = 2, rounds: int = 3, crash_at: int | None = None,
              reword_from: int | None = None, temperature: float = 0.0) -> None:
        """``reword_from``: the round from which prompts read differently (an edited world);
        ``temperature``: sample (seeded by the world's generator) instead of greedy."""
        for i in range(agents):
            self.add(Pinger(f"p{i}", rounds, crash_at if i == 0 else None, reword_from,
                            temperature))


class Interrupted(World):
    """Simulates Ctrl-C after the first calls have finished."""

    def setup(self) -> None:
        self.add(Pinger("p0", rounds=2, crash_at=None))
        self.env.process(self._ctrl_c())

    def _ctrl_c(self):
        yield self.env.timeout(1.5)
        raise KeyboardInterrupt


class NeedsParam(World):
    def setup(self, size: int) -> None:
        self.size = size
