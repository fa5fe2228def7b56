"""Conversation: two or more agents take turns speaking, each line an LLM call.

A conversation is a :class:`~scalesim.turns.TurnOrder` plus a transcript. Every member runs
``yield from conversation.join(self)`` in its own process; members speak in the given order,
``lines_each`` lines each, and every line is written with the transcript so far in the prompt and
observed by the other members. Because the order is a TurnOrder, who speaks next is known exactly
to a distance oracle.

Members that are busy elsewhere are brought in by message: :meth:`Conversation.invite` sends each
guest a message whose content is the conversation (recorded on the world's interaction graph); a
guest that receives it calls ``join``. :meth:`Conversation.of` reads such a message. If a member
waits longer than ``patience`` for its turn (a guest never came), the conversation ends for all.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generator, Sequence

import simpy

from agents.llm_agent import LLMAgent
from scalesim import Message
from scalesim.turns import TurnOrder


class Conversation:
    """A turn-taking exchange among ``members`` (the first one speaks first)."""

    prompts: ClassVar[dict[str, str]] = {
        "open": "{place}You meet {others}. Say one short friendly sentence to {others}.",
        "reply": ("{place}You are talking with {others}. So far:\n{transcript}\n"
                  "Reply in one short sentence."),
        "heard": "{speaker} said to me: \"{line}\"",
    }

    def __init__(self, members: Sequence[LLMAgent], *, lines_each: int = 1, place: str = "",
                 patience: float | None = None) -> None:
        if len(members) < 2:
            raise ValueError("a conversation needs at least two members")
        self.env: simpy.Environment = members[0].env
        self.members = list(members)
        self.lines_each = lines_each
        self.place = place
        self.patience = patience
        self.transcript: list[tuple[str, str]] = []
        self.turns = TurnOrder(self.env, members, name="conversation:" + "+".join(
            m.name for m in members))
        #: Fires with the transcript when the conversation is over.
        self.ended: simpy.Event = self.env.event()

    @property
    def over(self) -> bool:
        return self.ended.triggered

    def invite(self, host: LLMAgent) -> None:
        """``host`` sends every other member a message that carries this conversation."""
        for guest in self.members:
            if guest is not host:
                host.send(guest, {"kind": "conversation", "conversation": self})

    @staticmethod
    def of(message: Message | None) -> "Conversation | None":
        """The conversation an invitation message carries, else ``None``."""
        content = message.content if message is not None else None
        if isinstance(content, dict) and isinstance(content.get("conversation"), Conversation):
            return content["conversation"]
        return None

    def join(self, me: LLMAgent) -> Generator[simpy.Event, Any, list[tuple[str, str]]]:
        """Take part until my lines are said or the conversation ends; returns the transcript."""
        for _ in range(self.lines_each):
            ok = yield me.wait_for(self.turns.my_turn(me), self.patience)
            if not ok:  # closed, or patience ran out (None)
                self.end()
                return self.transcript
            line = yield from me.say(self._prompt(me))
            self.transcript.append((me.name, line))
            for other in self.members:
                if other is not me:
                    other.observe(self.prompts["heard"].format(speaker=me.name, line=line))
            self.turns.done(me)
        self.turns.remove(me)
        if not self.turns.members:
            self.end()
        return self.transcript

    def end(self) -> None:
        self.turns.close()
        if not self.ended.triggered:
            self.ended.succeed(self.transcript)

    def _prompt(self, me: LLMAgent) -> str:
        others = " and ".join(m.name for m in self.members if m is not me)
        place = f"At the {self.place}. " if self.place else ""
        if not self.transcript:
            return self.prompts["open"].format(place=place, others=others)
        transcript = "\n".join(f"{who}: {line}" for who, line in self.transcript[-6:])
        return self.prompts["reply"].format(place=place, others=others, transcript=transcript)
