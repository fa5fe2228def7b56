"""A memory stream: what an agent has observed, and which of it to bring into the next prompt.

After Generative Agents, but cheap. Every :class:`Observation` has a time, a text and an importance
from 1 to 10 (a keyword heuristic unless the caller gives one; no LLM call). :meth:`MemoryStream.
retrieve` scores each memory by recency (exponential decay in simulated time), importance and, when
a query is given, word overlap with it, and returns the best ``k``. Reflection is the agent's job
(it needs the LLM): the stream only says when one is due, every ``reflect_every`` observations.
The stream keeps at most ``capacity`` memories, forgetting the lowest-scored ones first, so a
thousand agents over a long run stay small.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Words that make an observation memorable (each adds to the heuristic importance).
SALIENT = frozenset("""
    love hate angry afraid fight argue secret kill killed died dead vote voted elected accuse
    accused guilty wolf werewolf party festival wedding birthday fire accident crash jam blocked
    lost won win promise betray betrayed sorry thank help danger urgent viral news
""".split())

_WORDS = re.compile(r"[a-z']+")


def words(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def heuristic_importance(text: str) -> float:
    """1 (mundane) to 10 (memorable): a base of 2, +2 per salient word, +1 for a long text."""
    score = 2 + 2 * len(words(text) & SALIENT) + (1 if len(text) > 120 else 0)
    return float(min(score, 10))


@dataclass
class Observation:
    time: float
    text: str
    importance: float
    kind: str = "observation"  # or "reflection"


class MemoryStream:
    """An agent's observations with recency / importance / relevance retrieval."""

    def __init__(self, reflect_every: int = 0, half_life: float = 240.0,
                 capacity: int = 200) -> None:
        if reflect_every < 0 or half_life <= 0 or capacity < 1:
            raise ValueError("reflect_every must be >= 0, half_life > 0 and capacity >= 1")
        self.reflect_every = reflect_every
        self.half_life = half_life
        self.capacity = capacity
        self.items: list[Observation] = []
        self._since_reflection = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, time: float, text: str, importance: float | None = None,
            kind: str = "observation") -> Observation:
        item = Observation(time, text, heuristic_importance(text) if importance is None
                           else float(importance), kind)
        self.items.append(item)
        if kind == "observation":
            self._since_reflection += 1
        if len(self.items) > self.capacity:
            # Forget the memory that would be retrieved last right now.
            worst = min(range(len(self.items)), key=lambda i: self._score(self.items[i], time))
            self.items.pop(worst)
        return item

    def _score(self, item: Observation, now: float, query: set[str] | None = None) -> float:
        recency = math.exp2(-max(now - item.time, 0.0) / self.half_life)
        relevance = 0.0
        if query:
            relevance = len(query & words(item.text)) / len(query)
        return recency + item.importance / 10 + relevance

    def retrieve(self, now: float, k: int = 3, query: str | None = None) -> list[Observation]:
        """The ``k`` best memories at time ``now``, oldest first (how a prompt reads them)."""
        q = words(query) if query else None
        best = sorted(self.items, key=lambda it: self._score(it, now, q), reverse=True)[:k]
        return sorted(best, key=lambda it: it.time)

    def recent(self, n: int) -> list[Observation]:
        return self.items[-n:]

    @property
    def reflection_due(self) -> bool:
        return self.reflect_every > 0 and self._since_reflection >= self.reflect_every

    def reflected(self) -> None:
        """Reset the count towards the next reflection."""
        self._since_reflection = 0
