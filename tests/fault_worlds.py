"""Small worlds for the fault tests: adapters, failing calls, signals, and wall-clock pauses."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from runtime import RequestError
from scalesim import Agent, World


class Caller(Agent):
    """Makes ``rounds`` calls, one per time unit from ``start``; a failed call does not stop it.

    ``prompt`` is the text of each call (``REJECT ...`` makes the echo executor fail it);
    ``pause`` wall seconds pass before each call, so a subprocess run lasts long enough to be
    killed in the middle.
    """

    def __init__(self, name: str, rounds: int, prompt: str = "round", start: float = 0.0,
                 pause: float = 0.0, adapter: str | None = None) -> None:
        super().__init__(name, persona=f"You are {name}.", adapter=adapter)
        self.rounds, self.prompt, self.start, self.pause = rounds, prompt, start, pause
        self.errors: list[str] = []

    def run(self):
        yield self.wait(self.start)
        for i in range(self.rounds):
            yield self.wait(1)
            if self.pause:
                time.sleep(self.pause)
            try:
                yield self.llm(f"{self.prompt} {i}", max_tokens=4)
            except RequestError as exc:
                self.errors.append(str(exc))


class Failing(World):
    """``agents`` callers of whom the first ``rejected`` have every call rejected."""

    def setup(self, agents: int = 4, rejected: int = 1, rounds: int = 3) -> None:
        for i in range(agents):
            self.add(Caller(f"c{i}", rounds, prompt="REJECT" if i < rejected else "round"))


class Slow(World):
    """``agents`` callers pausing ``pause`` wall seconds before each of their ``rounds`` calls."""

    def setup(self, agents: int = 2, rounds: int = 50, pause: float = 0.05) -> None:
        for i in range(agents):
            self.add(Caller(f"s{i}", rounds, pause=pause))


class Signalled(World):
    """Sends this process ``signals`` (names, e.g. ``[SIGTERM]``) at sim time 2.5, 2.5, ..."""

    def setup(self, signals: tuple[str, ...] = ("SIGTERM",), rounds: int = 5) -> None:
        self.add(Caller("p0", rounds))
        self.env.process(self._signal(signals))
        #: Whether the world's own code went on after the signals (it does when the run waits
        #: for a safe point; a second signal stops it at once).
        self.went_on = False

    def _signal(self, signals: tuple[str, ...]):
        yield self.env.timeout(2.5)
        for name in signals:
            os.kill(os.getpid(), getattr(signal, name))
        self.went_on = True

    def metrics(self) -> dict:
        return {**super().metrics(), "went_on": self.went_on}


def adapter_paths(adapter_dir: str, agents: int) -> list[str]:
    return [str(Path(adapter_dir) / f"adapter-{i:03d}") for i in range(agents)]


class Adapted(World):
    """Agent ``a{i}`` uses ``adapter_dir/adapter-{i:03d}``; declared unless ``declare`` is false.

    ``corrupt_at`` truncates the last agent's adapter file at that sim time, before that agent's
    first call (it starts at ``corrupt_at + 1``): a file broken after the run's checks.
    """

    @classmethod
    def adapters(cls, adapter_dir: str = "", agents: int = 2, declare: bool = True,
                 **params: Any) -> list[str]:
        return adapter_paths(adapter_dir, agents) if declare else []

    def setup(self, adapter_dir: str = "", agents: int = 2, rounds: int = 3, declare: bool = True,
              corrupt_at: float | None = None) -> None:
        paths = adapter_paths(adapter_dir, agents)
        for i, path in enumerate(paths):
            late = corrupt_at is not None and i == agents - 1
            self.add(Caller(f"a{i}", rounds, adapter=path, start=corrupt_at + 1 if late else 0))
        if corrupt_at is not None:
            self.env.process(self._corrupt(Path(paths[-1]), corrupt_at))

    def _corrupt(self, adapter: Path, at: float):
        yield self.env.timeout(at)
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


class Listed(World):
    """One agent per adapter directory found in ``adapter_dir`` (which must exist)."""

    @classmethod
    def adapters(cls, adapter_dir: str = "", **params: Any) -> list[str]:
        return [str(p) for p in sorted(Path(adapter_dir).iterdir())]

    def setup(self, adapter_dir: str = "", rounds: int = 2) -> None:
        for i, path in enumerate(self.adapters(adapter_dir)):
            self.add(Caller(f"l{i}", rounds, adapter=path))
