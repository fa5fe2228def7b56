"""LLMAgent: an agent with a persona, an optional adapter, a memory stream and robust replies.

World authors subclass :class:`LLMAgent` and write ``run()`` with three helpers that are
generators (use ``yield from``) and return plain values:

* ``text = yield from self.say(prompt)`` — one short free-text line;
* ``word = yield from self.choose(question, ["left", "right"], default="left")`` — one option out
  of a list; a reply that names none falls back to ``default`` and is counted in
  :attr:`LLMAgent.parse_fallbacks`;
* ``yield from self.maybe_reflect()`` — an LLM reflection over recent memories every
  ``reflect_every`` observations (none when 0).

With ``history_turns > 0`` the agent keeps a running conversation with the model: every call
sends the exchanges so far (:attr:`LLMAgent.history`, rendered as chat turns after the persona)
and adds its own prompt and reply. The engine's prefix cache then finds each earlier call at
the start of the next one and computes only what is new. When the conversation grows past
``history_turns`` exchanges, its older half is folded into one summary turn (a rewrite: the
next call reuses the persona and recomputes the rest, then reuse resumes).

``self.observe(text)`` adds to the memory stream and ``self.recall(query)`` renders the best
memories for a prompt. Every prompt comes from :attr:`LLMAgent.prompts`, the one place where this
agent type's templates live; a subclass overrides entries by name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generator, Sequence, TypeVar

import simpy

from agents.memory import MemoryStream, Observation
from agents.parsing import first_line, pick
from runtime import Constraint
from runtime.request import Completion
from scalesim import Agent, World

Reply = Generator[simpy.Event, Any, str]

W = TypeVar("W", bound=World)


class LLMAgent(Agent[W]):
    """An :class:`~scalesim.Agent` that talks through prompt templates and remembers.

    As with :class:`~scalesim.Agent`, ``class Villager(LLMAgent["Town"])`` types ``self.world``.
    """

    prompts: ClassVar[dict[str, str]] = {
        # {options}: "a, b, c"; {either}: "a, b or c". A tiny model rarely answers with a bare
        # word, but a short sentence that names an option parses fine (see agents.parsing.pick).
        "choose": "{question}\nAnswer with one word: {either}.",
        "reflect": ("These are things you noticed recently:\n{memories}\n"
                    "In one short sentence, what do you conclude from them?"),
        "memories": "You remember:\n{memories}\n\n",
        "summary": "(Earlier in this conversation you said: {said})",
    }

    #: ``choose`` holds the reply to one of its options on executors that sample real tokens
    #: (a grammar mask: the reply *is* an option); False asks freely and parses the reply, as
    #: before structured output. The modeled executor answers with its placeholders either way.
    constrained_choices: ClassVar[bool] = True

    def __init__(self, name: str, persona: str = "", adapter: str | None = None, *,
                 max_tokens: int = 24, choice_tokens: int = 8, temperature: float = 0.0,
                 reflect_every: int = 0, memory_capacity: int = 200,
                 history_turns: int = 0) -> None:
        super().__init__(name, persona=persona, adapter=adapter)
        self.max_tokens = max_tokens
        self.choice_tokens = choice_tokens
        #: Sampling temperature of every call (0: greedy). Seeds come from the world's generator,
        #: so a run stays reproducible.
        self.temperature = temperature
        self.memory = MemoryStream(reflect_every=reflect_every, capacity=memory_capacity)
        if history_turns < 0:
            raise ValueError(f"agent {name!r}: history_turns must be >= 0, got {history_turns}")
        #: Exchanges kept in the running conversation (0: every call stands alone).
        self.history_turns = history_turns
        #: The running conversation, oldest first: ``(role, content)`` turns.
        self.history: list[tuple[str, str]] = []
        self.counters.update(parse_fallbacks=0, reflections=0)  # reported even when none

    @property
    def parse_fallbacks(self) -> int:
        """Replies that could not be parsed and were replaced by a default (a counter)."""
        return self.counters["parse_fallbacks"]

    @property
    def reflections(self) -> int:
        """Reflections written into the memory stream (a counter)."""
        return self.counters["reflections"]

    def observe(self, text: str, importance: float | None = None) -> Observation:
        return self.memory.add(self.now if self.in_world else 0.0, text, importance)

    def recall(self, query: str | None = None, k: int = 3) -> str:
        """The ``k`` best memories as a prompt paragraph ('' when there are none)."""
        items = self.memory.retrieve(self.now, k=k, query=query)
        if not items:
            return ""
        return self.prompts["memories"].format(memories="\n".join(f"- {m.text}" for m in items))

    def say(self, prompt: str, max_tokens: int | None = None, default: str = "...") -> Reply:
        """One line of free text; an empty reply becomes ``default`` (counted as a fallback)."""
        reply = yield from self._one_line(prompt, max_tokens or self.max_tokens)
        line = first_line(reply.text)
        if not line:
            self.count("parse_fallbacks")
            return default
        return line

    def _one_line(self, prompt: str, max_tokens: int, options: list[str] | None = None
                  ) -> Generator[simpy.Event, Any, Completion]:
        """One call of one line, with the running conversation when the agent keeps one;
        with ``options``, a reply held to one of them where the engine can (see ``choose``)."""
        history = tuple(self.history) if self.history_turns else ()
        constraint = None if options is None else Constraint.choice(options, required=False)
        reply = yield self.llm(prompt, max_tokens=max_tokens, stop=("\n",),
                               temperature=self.temperature, history=history,
                               constraint=constraint)
        if self.history_turns:
            self.history += [("user", prompt), ("assistant", first_line(reply.text))]
            if len(self.history) > 2 * self.history_turns:
                self._fold_history()
        return reply

    def _fold_history(self) -> None:
        """Replace the older half of the conversation by one summary turn."""
        keep = 2 * (self.history_turns // 2)
        old, self.history = self.history[:-keep or None], self.history[-keep:] if keep else []
        said = [text for role, text in old if role == "assistant" and text]
        summary = self.prompts["summary"].format(said=" / ".join(said)[-600:] or "nothing")
        self.history.insert(0, ("user", summary))

    def choose(self, question: str, options: Sequence[str], default: str | None = None) -> Reply:
        """One of ``options`` (``default``, else the first, when the reply names none)."""
        if not options:
            raise ValueError(f"agent {self.name!r}: choose() needs at least one option")
        either = options[0] if len(options) == 1 else (
            ", ".join(options[:-1]) + " or " + options[-1])
        prompt = self.prompts["choose"].format(question=question, options=", ".join(options),
                                               either=either)
        constrain = self.constrained_choices and all(isinstance(o, str) and o for o in options)
        reply = yield from self._one_line(prompt, self.choice_tokens,
                                          list(options) if constrain else None)
        choice = pick(reply.text, options)
        if choice is None:
            self.count("parse_fallbacks")
            return default if default is not None else options[0]
        return choice

    def reflect(self) -> Reply:
        """Ask the LLM what the recent memories add up to; store the answer as a reflection."""
        recent = self.memory.recent(max(self.memory.reflect_every, 3))
        prompt = self.prompts["reflect"].format(memories="\n".join(f"- {m.text}" for m in recent))
        insight = yield from self.say(prompt)
        self.memory.add(self.now, insight, importance=8, kind="reflection")
        self.memory.reflected()
        self.count("reflections")
        return insight

    def maybe_reflect(self) -> Generator[simpy.Event, Any, str | None]:
        """Reflect if enough has been observed since the last reflection; else do nothing."""
        if self.memory.reflection_due:
            return (yield from self.reflect())
        return None


def parse_fallbacks(world: World) -> int:
    """Total unparseable replies of the world's agents (also in ``World.counters()``)."""
    return world.counters().get("parse_fallbacks", 0)


def reflections(world: World) -> int:
    """Total reflections of the world's agents (also in ``World.counters()``)."""
    return world.counters().get("reflections", 0)
