"""Maple Hollow: a Generative-Agents-like town where villagers live one day.

Each villager wakes at its own hour, walks between places on a networkx street graph (travel takes
simulated minutes), remembers what it sees in a memory stream, asks the LLM what it does at each
stop of its daily schedule, reflects every few observations, and invites someone it finds at the
same place to a short conversation (an :class:`agents.Conversation`). Sim time is minutes since
midnight. Built on the agents library: a villager is an :class:`agents.LLMAgent`.

Distance sources it exercises: **timers** (wake-up, schedule and travel times are in the event
queue) and the **interaction graph** (an invited villager speaks only once the invitation arrives;
the conversation itself is a turn order).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from agents import Conversation, LLMAgent
from scalesim import World

STREETS = [  # (place, place, walking minutes)
    ("homes", "bakery", 5), ("homes", "park", 8), ("bakery", "market", 4),
    ("market", "cafe", 3), ("cafe", "library", 6), ("park", "library", 7),
    ("market", "town hall", 5), ("town hall", "tavern", 4), ("park", "tavern", 10),
]

PEOPLE = [  # name, age, occupation, trait, wake hour, [(hour, place, activity), ...]
    ("Ada Brook", 34, "baker", "warm and loves gossip", 5,
     [(6, "bakery", "bake the morning bread"), (11, "market", "sell pastries"),
      (15, "park", "take a walk"), (19, "tavern", "meet friends")]),
    ("Ben Carter", 41, "mayor", "earnest and a little pompous", 7,
     [(8, "cafe", "read the news"), (9, "town hall", "hold office hours"),
      (13, "market", "talk to merchants"), (19, "tavern", "celebrate a small victory")]),
    ("Cleo Diaz", 27, "librarian", "curious and quiet", 7,
     [(8, "library", "open the library"), (12, "cafe", "eat lunch"),
      (13, "library", "sort new books"), (18, "park", "read under a tree")]),
    ("Dev Patel", 30, "painter", "dreamy and generous", 9,
     [(10, "park", "paint the pond"), (12, "cafe", "eat lunch"),
      (15, "market", "buy pigments"), (20, "tavern", "show a new sketch")]),
    ("Eve Fischer", 55, "market vendor", "shrewd and funny", 5,
     [(6, "market", "set up the fruit stall"), (12, "bakery", "buy bread"),
      (13, "market", "sell fruit"), (18, "tavern", "count the day's coins")]),
    ("Finn Gallagher", 19, "student", "restless and curious", 8,
     [(9, "library", "study for exams"), (12, "cafe", "meet a friend"),
      (15, "park", "play football"), (19, "tavern", "listen to music")]),
    ("Gia Horvat", 38, "cafe owner", "cheerful and organised", 6,
     [(7, "cafe", "open the cafe"), (14, "market", "buy milk and coffee"),
      (15, "cafe", "serve afternoon guests"), (20, "park", "walk the dog")]),
    ("Hugo Ito", 62, "retired sailor", "full of stories", 6,
     [(7, "park", "feed the ducks"), (10, "bakery", "buy a croissant"),
      (13, "town hall", "complain about the harbour"), (17, "tavern", "tell sea stories")]),
]

FIRST_NAMES = ["Iris", "Jon", "Kira", "Leo", "Mia", "Nils", "Oona", "Pia", "Quinn", "Rosa",
               "Sam", "Tara", "Uma", "Vik", "Wren", "Xavi", "Yara", "Zeno"]
JOBS = [("blacksmith", "market"), ("teacher", "library"), ("gardener", "park"),
        ("barista", "cafe"), ("clerk", "town hall"), ("musician", "tavern"),
        ("apprentice baker", "bakery")]
TRAITS = ["shy", "talkative", "practical", "romantic", "grumpy", "optimistic"]


@dataclass(frozen=True)
class Stop:
    hour: int
    place: str
    activity: str


def clock(minutes: float) -> str:
    return f"{int(minutes // 60):02d}:{int(minutes % 60):02d}"


class Villager(LLMAgent["Town"]):
    """A villager follows its schedule, and talks with whoever it meets or whoever invites it."""

    prompts = {
        **LLMAgent.prompts,
        "arrive": ("{memories}It is {time}. You have just arrived at the {place} to {activity}. "
                   "In one short sentence, what do you do first?"),
    }

    def __init__(self, name: str, persona: str, wake_hour: int, schedule: list[Stop],
                 max_tokens: int, reflect_every: int = 0) -> None:
        super().__init__(name, persona=persona, max_tokens=max_tokens, reflect_every=reflect_every)
        self.wake_hour = wake_hour
        self.schedule = schedule
        self.place = "homes"
        #: Until when we idle (blocked in ``receive``, ready to join a conversation); else None.
        self.idle_until_time: float | None = None

    def run(self):
        yield from self.idle_until(self.wake_hour * 60)
        for stop in self.schedule:
            yield from self.idle_until(stop.hour * 60)
            minutes = self.world.travel_minutes(self.place, stop.place)
            self.world.hint_invitee(self, stop.place, self.now + minutes)
            yield self.wait(minutes)
            self.world.move(self, stop.place)
            action = yield from self.say(self.prompts["arrive"].format(
                memories=self.recall(query=stop.place, k=2), time=clock(self.now),
                place=stop.place, activity=stop.activity))
            self.observe(f"At {clock(self.now)} at the {stop.place}: {action}")
            yield from self.maybe_reflect()
            other = self.world.someone_to_meet(self)
            if other is not None:
                yield from self.talk_with(other)

    def idle_until(self, time: float):
        """Pass time until ``time``, joining any conversation we are invited to meanwhile."""
        while self.now < time:
            self.idle_until_time = time
            message = yield self.receive(timeout=time - self.now)
            self.idle_until_time = None
            talk = Conversation.of(message)
            if talk is not None and not talk.over:
                yield from talk.join(self)

    def talk_with(self, other: "Villager"):
        # We open, the other answers once its invitation arrives; after 30 minutes we move on.
        talk = Conversation([self, other], place=self.place, patience=30)
        talk.invite(self)
        yield from talk.join(self)
        yield self.wait_for(talk.ended, 30)  # usually ends at once, when the other replies
        talk.end()
        self.world.conversations += 1


class Town(World):
    """Villagers, the street graph, and who has already talked to whom today."""

    def setup(self, villagers: int = 8, max_tokens: int = 24, reflect_every: int = 0) -> None:
        self.streets = nx.Graph()
        self.streets.add_weighted_edges_from(STREETS, weight="minutes")
        self.met: set[frozenset[str]] = set()
        self.present: dict[str, dict[str, Villager]] = {p: {} for p in self.streets.nodes}
        self.conversations = 0
        for i in range(villagers):
            name, age, job, trait, wake, stops = self._person(i)
            persona = (f"You are {name}, {age}, the {job} of the village of Maple Hollow. "
                       f"You are {trait}. Answer briefly, in the first person.")
            villager = Villager(name, persona, wake, [Stop(*s) for s in stops], max_tokens,
                                reflect_every)
            self.add(villager)
            self.present["homes"][name] = villager

    def _person(self, i: int) -> tuple:
        if i < len(PEOPLE):
            return PEOPLE[i]
        job, workplace = JOBS[i % len(JOBS)]
        others = sorted(p for p in self.streets.nodes if p not in ("homes", workplace))
        afternoon, evening = self.random.sample(others, 2)
        first, n = FIRST_NAMES[i % len(FIRST_NAMES)], i // len(FIRST_NAMES)
        # Surname initials A-Z, then A2-Z2, ...: unique names for any number of villagers.
        name = f"{first} {chr(65 + n % 26)}{n // 26 + 1 if n >= 26 else ''}."
        return (name, self.random.randint(18, 70), job, self.random.choice(TRAITS),
                self.random.randint(5, 8),
                [(9, workplace, f"work as the {job}"), (13, afternoon, "take a break"),
                 (14, workplace, "finish the day's work"), (19, evening, "relax")])

    def travel_minutes(self, a: str, b: str) -> float:
        return nx.shortest_path_length(self.streets, a, b, weight="minutes") if a != b else 0

    def move(self, villager: Villager, place: str) -> None:
        del self.present[villager.place][villager.name]
        villager.place = place
        self.present[place][villager.name] = villager
        self.hint_invitee(villager, place, self.now)  # someone may have come since it set out

    def hint_invitee(self, villager: Villager, place: str, arrival: float) -> None:
        """Tell the oracle whom ``villager``, arriving at ``place`` at ``arrival``, will invite.

        On arrival a villager asks the LLM once (no sim time) and then invites the first villager
        there it has not met: if that one idles there until then, it speaks at ``arrival``, not at
        its next stop. A wrong hint would keep its memory near until its next call, so we hint
        only when the invitee is sure to still be idling there.
        """
        invitee = self._unmet(villager, place)
        if invitee is None or invitee.idle_until_time is None:
            return
        if invitee.idle_until_time >= arrival:
            self.hint(invitee, arrival - self.now)

    def someone_to_meet(self, me: Villager) -> Villager | None:
        """Another villager at my place whom I have not talked to today."""
        other = self._unmet(me, me.place)
        if other is not None:
            self.met.add(frozenset((me.name, other.name)))
        return other

    def _unmet(self, me: Villager, place: str) -> Villager | None:
        for other in self.present[place].values():
            if other is not me and frozenset((me.name, other.name)) not in self.met:
                return other
        return None

    def metrics(self) -> dict:
        return {**super().metrics(), "conversations": self.conversations}
