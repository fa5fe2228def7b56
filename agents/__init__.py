"""Reusable agent types that a world composes rather than rewrites.

* :class:`LLMAgent` — persona, optional LoRA adapter, memory stream, robust ``say`` / ``choose``
  helpers that count unparseable replies, periodic reflection; prompt templates in one place.
* :class:`MemoryStream` — observations with recency / importance / relevance retrieval.
* :class:`Conversation` — two or more agents speak in turns (a :class:`scalesim.turns.TurnOrder`),
  joined directly or by invitation message.
* :func:`pick` — the option a free-text reply names, or ``None``.
"""

from agents.conversation import Conversation
from agents.llm_agent import LLMAgent, parse_fallbacks, reflections
from agents.memory import MemoryStream, Observation, heuristic_importance
from agents.parsing import first_line, pick

__all__ = [
    "Conversation",
    "LLMAgent",
    "MemoryStream",
    "Observation",
    "first_line",
    "heuristic_importance",
    "parse_fallbacks",
    "pick",
    "reflections",
]
