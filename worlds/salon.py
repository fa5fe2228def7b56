"""Salon: guests of a long evening keep running conversations with the model.

Every guest follows the same house rules (a long preamble shared by all), has a persona of its
own and keeps its whole conversation so far in every prompt (``LLMAgent(history_turns=...)``):
each call sends the rules, the persona, every earlier exchange and one new line. Guests wake at
random times (continuous time, exponential gaps; ``synchronous``: in rounds every
``gap_minutes``, each guest in a round with probability ``participation``) and make a remark
to the room; with
probability ``reply_chance`` a neighbour in the acquaintance graph (a small world) is addressed
by it and answers before its own next remark. This is the request stream of chat-style agent frameworks (growing histories
over a shared system preamble), where a cache of whole prompts' prefixes saves most of the work.

Distance sources it exercises: **timers** (each guest's next remark is in the event queue) and
the **interaction graph** (a remark reaches a neighbour by message).
"""

from __future__ import annotations

import networkx as nx

from agents import LLMAgent
from scalesim import World

RULES = ("House rules of the salon. Guests speak one at a time and keep each remark to one "
         "short sentence. Be courteous: no insults, no shouting, no talking over others. Stay "
         "on the evening's topics: books, music, travel, food and the news of the town. When "
         "someone addresses you, answer them directly before changing the subject. Do not "
         "repeat what you already said tonight. The host may ring the bell; then the room "
         "falls silent. Refreshments are served in the garden room after the first hour. ")
TOPICS = ["a novel you are reading", "a journey you made", "a dish you cooked", "a concert",
          "the town's new bridge", "an old friend", "the weather this season", "a painting"]
TRAITS = ["cheerful", "grumpy", "shy", "witty", "pompous", "kind", "curious", "tired"]
JOBS = ["baker", "poet", "sailor", "doctor", "banker", "gardener", "painter", "judge"]


class Guest(LLMAgent["Salon"]):
    """Remarks at random times; answers the neighbours who address it."""

    prompts = {
        **LLMAgent.prompts,
        "remark": "Make one remark to the room about {topic}.",
        "answer": "{speaker} says to you: \"{line}\" Answer {speaker} in one sentence.",
    }

    def __init__(self, name: str, persona: str, remarks: int, **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.remarks = remarks
        self.answers = 0

    def run(self):
        made = 0
        while made < self.remarks:
            gap = self.world.next_gap()
            message = yield self.receive(timeout=gap)
            if message is not None:  # addressed by a neighbour: answer first
                yield from self.say(self.prompts["answer"].format(speaker=message.sender,
                                                                  line=message.content))
                self.answers += 1
                continue
            made += 1
            topic = self.world.random.choice(TOPICS)
            line = yield from self.say(self.prompts["remark"].format(topic=topic))
            listener = self.world.listener_of(self)
            if listener is not None:
                self.send(listener, line)


class Salon(World):
    """The guests, their acquaintances and the shared house rules."""

    def setup(self, guests: int = 4, remarks: int = 3, gap_minutes: float = 10.0,
              neighbours: int = 2, reply_chance: float = 0.5, rules_repeat: int = 1,
              history_turns: int = 8, max_tokens: int = 24, synchronous: bool = False,
              participation: float = 1.0) -> None:
        if guests < 2:
            raise ValueError(f"world.params.guests must be >= 2, got {guests}")
        if not 0 <= reply_chance <= 1:
            raise ValueError(f"world.params.reply_chance must be in [0, 1], got {reply_chance}")
        self.reply_chance = reply_chance
        self.gap_minutes = gap_minutes
        #: guests speak in rounds every ``gap_minutes``, not at random times
        self.synchronous = synchronous
        if not 0 < participation <= 1:
            raise ValueError(f"world.params.participation must be in (0, 1], got {participation}")
        self.participation = participation
        k = min(max(2, neighbours), guests - 1)
        acquaintances = nx.connected_watts_strogatz_graph(guests, k, 0.2,
                                                          seed=self.random.randrange(2**31))
        rules = RULES * rules_repeat
        self.guests: list[Guest] = []
        for i in range(guests):
            persona = (f"{rules}\nYou are guest {i}, a {self.random.choice(TRAITS)} "
                       f"{self.random.choice(JOBS)}.")
            self.guests.append(self.add(Guest(f"guest{i}", persona, remarks,
                                              history_turns=history_turns,
                                              max_tokens=max_tokens)))
        self.acquaintances = acquaintances

    def next_gap(self) -> float:
        """Minutes until a guest's next remark: exponential, or in rounds a whole number of
        rounds (each round a guest speaks with probability ``participation``)."""
        if not self.synchronous:
            return self.random.expovariate(1 / self.gap_minutes)
        rounds = 1
        while self.random.random() >= self.participation:
            rounds += 1
        return rounds * self.gap_minutes

    def listener_of(self, guest: Guest) -> Guest | None:
        """A neighbour who answers ``guest``'s remark, or nobody."""
        if self.random.random() >= self.reply_chance:
            return None
        index = int(guest.name.removeprefix("guest"))
        return self.guests[self.random.choice(sorted(self.acquaintances.neighbors(index)))]

    def metrics(self) -> dict:
        histories = [len(g.history) // 2 for g in self.guests]
        return {**super().metrics(), "answers": sum(g.answers for g in self.guests),
                "mean_history_exchanges": round(sum(histories) / len(histories), 2)}
