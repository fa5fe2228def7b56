"""Werewolf tables: several games in parallel, each speaking in a fixed order, voting each round.

Each table seats a few players, one of them secretly the werewolf. A round is one line from every
player in the table's speaking order (a :class:`scalesim.turns.TurnOrder`; a line takes
``speech_minutes`` of sim time), then everyone votes at once for who the werewolf is — one name
from the list of players still in. The most-voted player leaves the table (a tie eliminates
nobody). The villagers win when the wolf is voted out, the wolf when only two players are left;
after ``rounds`` rounds the game ends undecided. Tables run side by side, so their speakers'
calls are batched together.

Distance source it exercises: **turn order** — who speaks next at each table is known exactly
(``TurnOrder.upcoming()``); the simultaneous votes at the end of each round are all distance 0.
"""

from __future__ import annotations

import re
from collections import Counter

from agents import LLMAgent
from scalesim import World
from scalesim.turns import TurnOrder

SPEAKER_TAG = re.compile(r"^\w+:\s*")
NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]


class Player(LLMAgent["RoundTable"]):
    """Speaks when the table gives it the floor and votes when the round ends."""

    prompts = {
        **LLMAgent.prompts,
        "speak": ("You are playing werewolf with {others}. Round {round}. What was said:\n"
                  "{transcript}\nSay one short sentence to the table."),
        # Options at the end of the question ("Ann, Cy or Dee?") get a name back most often.
        "choose": "{question}: {either}?",
        "vote": "What was said:\n{transcript}\nWho is the werewolf",
    }

    def __init__(self, name: str, nick: str, persona: str, table: "Table", **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.nick = nick
        self.table = table

    def run(self):
        table = self.table
        while True:
            if not (yield table.turns.my_turn(self)):
                return  # voted out, or the game is over
            others = ", ".join(p.nick for p in table.seated if p is not self)
            line = yield from self.say(self.prompts["speak"].format(
                others=others, round=table.turns.round + 1, transcript=table.recent()))
            line = SPEAKER_TAG.sub("", line) or line  # the model often echoes "Ann: ..."
            yield self.wait(table.speech_minutes)
            table.transcript.append((self.nick, line))
            table.turns.done(self)
            yield table.voting
            candidates = [p.nick for p in table.seated if p is not self]
            vote = yield from self.choose(self.prompts["vote"].format(
                transcript=table.recent()), candidates, default=candidates[0])
            table.cast(self, vote)


class Table:
    """One game: its players, speaking order, transcript and votes; a moderator process runs it."""

    def __init__(self, world: "RoundTable", index: int, players: int, rounds: int,
                 speech_minutes: float, max_tokens: int, temperature: float) -> None:
        self.world = world
        self.index = index
        self.rounds = rounds
        self.speech_minutes = speech_minutes
        self.transcript: list[tuple[str, str]] = []
        self.votes: dict[str, str] = {}
        self.outcome = "undecided"
        self.eliminated: list[str] = []
        nicks = NAMES[:players]
        self.wolf = world.random.choice(nicks)
        self.seated: list[Player] = []
        for nick in nicks:
            role = ("You are secretly the werewolf: never admit it and blame someone else."
                    if nick == self.wolf else
                    "You are a villager. One player is secretly a werewolf; find them.")
            persona = f"You are {nick}, a player in a game of werewolf. {role} Be brief."
            self.seated.append(Player(f"t{index}.{nick}", nick, persona, self,
                                      max_tokens=max_tokens, temperature=temperature))
        self.turns = TurnOrder(world.env, self.seated, pause_between_rounds=True,
                               name=f"table {index}")
        self.voting = world.env.event()
        self._all_voted = world.env.event()

    def recent(self, lines: int = 6) -> str:
        return "\n".join(f"{who}: {line}" for who, line in self.transcript[-lines:]) or "(nothing)"

    def cast(self, voter: Player, nick: str) -> None:
        self.votes[voter.nick] = nick
        self.world.record_interaction(voter.name, f"t{self.index}.{nick}")
        if len(self.votes) == len(self.seated):
            self._all_voted.succeed()

    def moderate(self):
        for round_ in range(1, self.rounds + 1):
            yield self.turns.round_over()
            self.voting.succeed()
            yield self._all_voted
            self.voting, self._all_voted = self.world.env.event(), self.world.env.event()
            tally = Counter(self.votes.values()).most_common()
            self.votes.clear()
            if len(tally) == 1 or tally[0][1] > tally[1][1]:
                out = next(p for p in self.seated if p.nick == tally[0][0])
                self.seated.remove(out)
                self.eliminated.append(out.nick)
                self.turns.remove(out)
                if out.nick == self.wolf:
                    self.outcome = "villagers"
                    break
                if len(self.seated) <= 2:
                    self.outcome = "wolf"
                    break
            if round_ < self.rounds:
                self.turns.next_round()
        self.turns.close()


class RoundTable(World):
    """Several werewolf tables playing at the same time."""

    def setup(self, tables: int = 2, players: int = 4, rounds: int = 2,
              speech_minutes: float = 1.0, max_tokens: int = 20,
              temperature: float = 0.7) -> None:
        if not 3 <= players <= len(NAMES):
            raise ValueError(f"world.params.players must be 3..{len(NAMES)}, got {players}")
        # Sampling (temperature > 0) keeps greedy decoding from playing every table identically.
        self.tables = [Table(self, i, players, rounds, speech_minutes, max_tokens, temperature)
                       for i in range(tables)]
        for table in self.tables:
            for player in table.seated:
                self.add(player)
            self.env.process(table.moderate())

    def metrics(self) -> dict:
        outcomes = Counter(t.outcome for t in self.tables)
        return {**super().metrics(), "tables": len(self.tables),
                "rounds_played": sum(t.turns.round for t in self.tables),
                "eliminated": sum(len(t.eliminated) for t in self.tables),
                "villager_wins": outcomes["villagers"], "wolf_wins": outcomes["wolf"],
                "undecided": outcomes["undecided"]}
