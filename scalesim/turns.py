"""Turn taking: a fixed speaking order that the simulation knows ahead of time.

Round-based worlds (debates, werewolf, committee meetings, a conversation between two villagers)
let their members speak one after another in a fixed order. :class:`TurnOrder` is that order as a
simpy primitive::

    turns = TurnOrder(env, ["ann", "bob", "cy"])

    class Debater(Agent):
        def run(self):
            while True:
                yield turns.my_turn(self)          # wakes when it is our turn
                reply = yield self.llm("Your argument?")
                turns.done(self)                   # hand the floor to the next member

Because the order is explicit, who calls the LLM next is known *exactly*: the current speaker
first, then the others in order. :meth:`TurnOrder.upcoming` returns that list and
:meth:`TurnOrder.positions` each member's place in it (0 = speaking now). An order created on a
:class:`~scalesim.environment.SimEnvironment` registers itself there; the distance oracle reads
the open ones (``env.open_turn_orders()``) and estimates each member from its place in
:meth:`TurnOrder.upcoming`.

Rounds: when the last member finishes, the round ends and its :meth:`TurnOrder.round_over` event
fires with the round number. With ``pause_between_rounds=True`` the next round waits for
:meth:`TurnOrder.next_round` (so the world can, say, hold a vote in between); otherwise the first
member speaks again at once. :meth:`TurnOrder.remove` takes a member out (an eliminated player,
someone who left the conversation) and :meth:`TurnOrder.close` ends the order for good: every
waiting member wakes, and :meth:`TurnOrder.my_turn` then returns ``False`` instead of ``True``.
"""

from __future__ import annotations

from typing import Any, Iterable

import simpy

from scalesim.environment import SimEnvironment


def _name(member: Any) -> str:
    return member if isinstance(member, str) else member.name


class TurnOrder:
    """Members speak one at a time, in a fixed cyclic order, round after round.

    ``members`` are agents or agent names; the order is the order given. An agent may belong to
    several orders (a table and a side conversation); the oracle takes its nearest turn.
    """

    def __init__(self, env: simpy.Environment, members: Iterable[Any], *,
                 pause_between_rounds: bool = False, name: str = "") -> None:
        self.env = env
        self.name = name
        self.members: list[str] = [_name(m) for m in members]
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"turn order {name!r}: a member appears twice in {self.members}")
        if not self.members:
            raise ValueError(f"turn order {name!r}: needs at least one member")
        self.pause_between_rounds = pause_between_rounds
        #: Completed rounds so far.
        self.round = 0
        #: Index into :attr:`members` of the current speaker; ``None`` between rounds.
        self.index: int | None = 0
        self.closed = False
        self._waiting: dict[str, simpy.Event] = {}
        self._round_over: simpy.Event = env.event()
        if isinstance(env, SimEnvironment):  # where a distance oracle finds it
            env.turn_orders.append(self)

    def __repr__(self) -> str:
        return f"<TurnOrder {self.name or id(self)} round={self.round} speaker={self.speaker}>"

    # -- what the distance oracle reads -------------------------------------------------------

    @property
    def speaker(self) -> str | None:
        """The member who holds the floor, or ``None`` between rounds and once closed."""
        if self.closed or self.index is None:
            return None
        return self.members[self.index]

    def upcoming(self) -> list[str]:
        """Every member, in the order they will next speak: the current speaker first.

        Between rounds the next round's order is returned (the first member first). Empty once
        the order is closed.
        """
        if self.closed:
            return []
        start = 0 if self.index is None else self.index
        return self.members[start:] + self.members[:start]

    def positions(self) -> dict[str, int]:
        """``{member: turns before it speaks}``; 0 is the current (or next round's first) speaker."""
        return {name: i for i, name in enumerate(self.upcoming())}

    def position(self, member: Any) -> int | None:
        """Turns before ``member`` speaks, or ``None`` if it is not (or no longer) a member."""
        return self.positions().get(_name(member))

    # -- what the members do ------------------------------------------------------------------

    def my_turn(self, member: Any) -> simpy.Event:
        """An event that fires when ``member`` holds the floor.

        Its value is ``True``, or ``False`` if the order was closed (or the member removed)
        before its turn came: the member should then stop taking part.
        """
        name = _name(member)
        event = self.env.event()
        if self.closed or name not in self.members:
            return event.succeed(False)
        if self.speaker == name:
            return event.succeed(True)
        if name in self._waiting:
            raise RuntimeError(f"turn order {self.name!r}: {name} is already waiting for its turn")
        self._waiting[name] = event
        return event

    def done(self, member: Any) -> None:
        """``member`` yields the floor to the next member (it must be the current speaker).

        A no-op once the order is closed: the member may have been speaking when it closed.
        """
        name = _name(member)
        if self.closed:
            return
        if self.speaker != name:
            raise RuntimeError(f"turn order {self.name!r}: {name} called done() but the speaker "
                               f"is {self.speaker}")
        assert self.index is not None  # a member holds the floor
        self._advance(self.index + 1)

    def round_over(self) -> simpy.Event:
        """An event that fires with the round number when the current round ends."""
        return self._round_over

    def next_round(self) -> None:
        """Start the next round after a pause (``pause_between_rounds=True``)."""
        if self.index is not None or self.closed:
            raise RuntimeError(f"turn order {self.name!r}: next_round() while a round is running")
        self._advance(0)

    def remove(self, member: Any) -> None:
        """Take ``member`` out of the order; if it held the floor, the next member gets it."""
        name = _name(member)
        if name not in self.members:
            return
        i = self.members.index(name)
        self.members.pop(i)
        waiting = self._waiting.pop(name, None)
        if waiting is not None:
            waiting.succeed(False)
        if not self.members:
            self.close()
        elif self.index is not None:
            if i < self.index:
                self.index -= 1
            elif i == self.index:
                self._advance(i)

    def close(self) -> None:
        """End the order: waiting members wake with ``False``; nobody speaks again."""
        if self.closed:
            return
        self.closed = True
        for event in self._waiting.values():
            event.succeed(False)
        self._waiting.clear()
        if not self._round_over.triggered:
            self._round_over.succeed(self.round)

    def _advance(self, index: int) -> None:
        if index >= len(self.members):
            self.round += 1
            ended, self._round_over = self._round_over, self.env.event()
            ended.succeed(self.round)
            if self.pause_between_rounds:
                self.index = None
                return
            index = 0
        self.index = index
        waiting = self._waiting.pop(self.members[index], None)
        if waiting is not None:
            waiting.succeed(True)

