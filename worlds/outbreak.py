"""Fever town: a fever spreads over a dense contact graph while people judge rumours about it.

People (a few dozen to a few thousand) live on a small-world contact graph (networkx
Watts-Strogatz: everyone knows ``contacts`` neighbours, a few of them far away). Sim time is
minutes since the first midnight. Each person goes out once a day at its own time of day and
visits ``meetings`` of its contacts, one after another (a visit takes ``visit_minutes``);
between outings it sleeps in ``receive()`` until the next outing or until someone visits it.

The fever is a simple SEIR process read off the clock: an infected person is infectious from
``latent_days`` after infection for ``infectious_days``, and feels sick from ``incubation_days``
until it recovers. A visit passes the fever either way with probability ``transmission``. Whoever
believes a news item passes it on to everyone it visits; ``news_reach`` people hear each of the
``seed_news`` first items on the radio at the start (and judge it when they next wake up).

Most wake-ups need no thought: a person calls the LLM only when it wakes with fresh news to
judge ("Is this news true?") or with new symptoms ("Will you stay at home until you are well?").
The answers change behaviour: a believer passes the news on and, for news about the fever, meets
one contact a day ("careful" news) or ``meetings + 2`` ("careless" news); someone who stays home
skips its outings and gets no visitors until it recovers. A reply that is neither yes nor no
counts as no.

Distance sources it exercises: **receive deadlines that are mostly false alarms** — every person
is blocked in ``receive(timeout=...)`` until its outing (an upper bound), is woken several
times a day by visits over a **dense interaction graph**, and calls the LLM on only a few of
those wake-ups.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from agents import LLMAgent
from scalesim import World

DAY = 1440.0

NEWS = [  # headline, what a believer does on its outings (careful: 1 visit, careless: 2 more)
    ("The health office says the fever spreads when people meet. See only one friend a day.",
     "careful"),
    ("A man at the market says the fever is just a cold and nothing to worry about.", "careless"),
    ("The town pool opens again on Saturday.", None),
    ("Doctors say washing hands keeps the fever away.", "careful"),
    ("The baker says his fresh bread cures the fever.", "careless"),
    ("The school choir sings in the square on Sunday.", None),
]

JOBS = ["nurse", "teacher", "baker", "farmer", "clerk", "student", "driver", "shopkeeper",
        "retired miner", "carpenter"]
TRAITS = ["careful", "easygoing", "anxious", "sociable", "stubborn", "trusting", "sceptical"]


@dataclass(frozen=True)
class Visit:
    """What a visitor brings: the news it believes, and maybe the fever."""

    news: tuple[int, ...]
    infectious: bool


class Person(LLMAgent["Outbreak"]):
    """Goes out once a day, is visited by its contacts, and thinks only when something is new."""

    prompts = {
        **LLMAgent.prompts,
        # "... Say yes or no." after a short question gets SmolLM2-135M to answer yes or no
        # most often; "Answer with one word" gets sentences like "I believe it." back.
        "choose": "{question} Say {either}.",
        "news": "A friend tells you: \"{headline}\" Is this news true?",
        "fever": "You woke up with a fever and a cough. Will you stay at home until you are well?",
    }

    def __init__(self, index: int, persona: str, outing: float, meetings: int,
                 **kwargs) -> None:
        super().__init__(f"p{index}", persona, **kwargs)
        self.index = index             # node of the contact graph
        self.next_outing = outing      # sim time of the next outing
        self.meetings = meetings       # contacts visited per outing
        self.infected_at: float | None = None
        self.asked_about_fever = False
        self.staying_home = False
        self.heard: set[int] = set()   # news judged already
        self.fresh: list[int] = []     # news heard since the last wake-up
        self.believed: list[int] = []
        self.wakeups = self.thinking_wakeups = self.calls = self.outings = self.skipped = 0

    def run(self):
        while True:
            # A call that takes simulated time may end after the outing was due: go at once.
            message = yield self.receive(timeout=max(0.0, self.next_outing - self.now))
            self.wakeups += 1
            if message is not None:
                visit: Visit = message.content
                self.world.expose(self, visit.infectious)
                self.fresh.extend(visit.news)
            yield from self.think()
            if message is None:
                yield from self.go_out()

    def think(self):
        """Ask the LLM about new symptoms and about news not judged yet; nothing else."""
        world = self.world
        news = [n for n in dict.fromkeys(self.fresh) if n not in self.heard]
        self.fresh.clear()
        feverish = world.has_symptoms(self) and not self.asked_about_fever
        if not news and not feverish:
            return
        self.thinking_wakeups += 1
        if feverish:
            self.asked_about_fever = True
            self.staying_home = yield from self.ask(self.prompts["fever"])
            world.stayed_home += self.staying_home
        for n in news:
            self.heard.add(n)
            if (yield from self.ask(self.prompts["news"].format(headline=NEWS[n][0]))):
                self.believed.append(n)
                world.believers[n] += 1
                effect = NEWS[n][1]
                if effect == "careful":
                    self.meetings = 1
                elif effect == "careless":
                    self.meetings = world.meetings + 2

    def ask(self, question: str):
        """One yes/no call to the LLM; an answer that is neither counts as no."""
        self.calls += 1
        return (yield from self.choose(question, ["yes", "no"], default="no")) == "yes"

    def go_out(self):
        world = self.world
        self.next_outing += DAY
        if self.staying_home:
            if world.is_sick(self):
                self.skipped += 1
                return
            self.staying_home = False  # well again
        self.outings += 1
        for other in world.visitable(self, self.meetings):
            world.expose(self, world.is_infectious(other))
            self.send(other, Visit(tuple(self.believed), world.is_infectious(self)))
            world.visits += 1
            yield self.wait(world.visit_minutes)


class Outbreak(World):
    """The contact graph, the fever's clock, and the news items."""

    def setup(self, people: int = 30, contacts: int = 6, rewiring: float = 0.1,
              meetings: int = 3, visit_minutes: float = 20, transmission: float = 0.15,
              seed_infections: int = 3, seed_news: int = 2, news_reach: int = 3,
              latent_days: float = 1.0, incubation_days: float = 2.0,
              infectious_days: float = 5.0, temperature: float = 0.9,
              max_tokens: int = 8) -> None:
        if not 2 <= contacts < people:
            raise ValueError(f"world.params.contacts must be 2..people-1, got {contacts}")
        if not 0 <= seed_news <= len(NEWS):
            raise ValueError(f"world.params.seed_news must be 0..{len(NEWS)}, got {seed_news}")
        self.meetings = meetings
        self.visit_minutes = visit_minutes
        self.transmission = transmission
        self.latent = latent_days * DAY
        self.incubation = incubation_days * DAY
        self.infectious = infectious_days * DAY
        self.contacts = nx.connected_watts_strogatz_graph(people, contacts, rewiring,
                                                          seed=self.random.getrandbits(32))
        self.people: list[Person] = []
        self.infections = self.visits = self.stayed_home = 0
        self.believers = [0] * len(NEWS)
        self.seed_news = seed_news
        for i in range(people):
            persona = (f"You are a {self.random.choice(TRAITS)} {self.random.choice(JOBS)} in a "
                       "small town. Answer yes or no.")
            outing = self.random.uniform(7 * 60, 21 * 60)  # time of day of the daily outing
            person = Person(i, persona, outing, meetings, temperature=temperature,
                            choice_tokens=max_tokens)
            self.people.append(person)
            self.add(person)
        for person in self.random.sample(self.people, seed_infections):
            # Infected up to a day before the start: some are infectious already.
            self.infect(person, at=-self.random.uniform(0, DAY))
        for n in range(seed_news):  # heard on the radio; judged at the next wake-up
            for person in self.random.sample(self.people, min(news_reach, people)):
                person.fresh.append(n)

    # -- the fever, read off the clock ---------------------------------------------------------

    def infect(self, person: Person, at: float) -> None:
        person.infected_at = at
        self.infections += 1

    def expose(self, person: Person, source_infectious: bool) -> None:
        if (source_infectious and person.infected_at is None
                and self.random.random() < self.transmission):
            self.infect(person, self.now)

    def _since(self, person: Person) -> float | None:
        return None if person.infected_at is None else self.now - person.infected_at

    def is_infectious(self, person: Person) -> bool:
        t = self._since(person)
        return t is not None and self.latent <= t < self.latent + self.infectious

    def has_symptoms(self, person: Person) -> bool:
        t = self._since(person)
        return t is not None and self.incubation <= t < self.latent + self.infectious

    def is_sick(self, person: Person) -> bool:
        """Not yet recovered (incubating or ill)."""
        t = self._since(person)
        return t is not None and t < self.latent + self.infectious

    def visitable(self, person: Person, k: int) -> list[Person]:
        """Up to ``k`` random contacts of ``person`` who are not staying home."""
        nearby = [self.people[j] for j in self.contacts[person.index]]
        open_doors = [p for p in nearby if not p.staying_home]
        return self.random.sample(open_doors, min(k, len(open_doors)))

    def metrics(self) -> dict:
        people = self.people
        wakeups = sum(p.wakeups for p in people)
        thinking = sum(p.thinking_wakeups for p in people)
        return {**super().metrics(), "infections": self.infections,
                "infectious_now": sum(self.is_infectious(p) for p in people),
                "recovered": sum(p.infected_at is not None and not self.is_sick(p)
                                 for p in people),
                "stayed_home": self.stayed_home, "outings": sum(p.outings for p in people),
                "outings_skipped": sum(p.skipped for p in people), "visits": self.visits,
                "news_believers": self.believers[:self.seed_news],
                "llm_calls": sum(p.calls for p in people),
                "wakeups": wakeups, "thinking_wakeups": thinking,
                "thinking_share": round(thinking / wakeups, 3) if wakeups else None}
