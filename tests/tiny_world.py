"""Small worlds used by the config, CLI and trace tests."""

from __future__ import annotations

from scalesim import Agent, World


class Pinger(Agent):
    def __init__(self, name: str, rounds: int, crash_at: int | None,
                 reword_from: int | None = None, temperature: float = 0.0) -> None:
        super().__init__(name, persona=f"You are {name}.")
        self.rounds = rounds
        self.crash_at = crash_at
        self.reword_from = reword_from
        self.temperature = temperature

    def run(self):
        for i in range(self.rounds):
            if i == self.crash_at:
                raise RuntimeError(f"{self.name} crashed in round {i}")
            yield self.wait(1)
            reworded = self.reword_from is not None and i >= self.reword_from
            yield self.llm(f"round {i}" + (", reworded" if reworded else ""), max_tokens=4,
                           temperature=self.temperature)


class Pingers(World):
    """``agents`` agents each make ``rounds`` calls, one per time unit."""

    def setup(self, agents: int = 2, rounds: int = 3, crash_at: int | None = None,
              reword_from: int | None = None, temperature: float = 0.0) -> None:
        """``reword_from``: the round from which prompts read differently (an edited world);
        ``temperature``: sample (seeded by the world's generator) instead of greedy."""
        for i in range(agents):
            self.add(Pinger(f"p{i}", rounds, crash_at if i == 0 else None, reword_from,
                            temperature))


class Interrupted(World):
    """Simulates Ctrl-C after the first calls have finished."""

    def setup(self) -> None:
        self.add(Pinger("p0", rounds=2, crash_at=None))
        self.env.process(self._ctrl_c())

    def _ctrl_c(self):
        yield self.env.timeout(1.5)
        raise KeyboardInterrupt


class NeedsParam(World):
    def setup(self, size: int) -> None:
        self.size = size


class Courier(Agent):
    """Carries a message to each of ``recipients`` every ``every`` time units; never calls the
    LLM."""

    calls_llm = False

    def __init__(self, name: str, recipients: list[str], every: float, trips: int) -> None:
        super().__init__(name)
        self.recipients, self.every, self.trips = recipients, every, trips

    def run(self):
        for trip in range(self.trips):
            yield self.wait(self.every)
            for recipient in self.recipients:
                self.send(recipient, f"parcel {trip}")
            self.count("trips")


class Reader(Agent):
    """Asks the LLM about every message it receives."""

    def run(self):
        while True:
            message = yield self.receive()
            yield self.llm(f"You got {message.content}. Say thanks.", max_tokens=4)


class Deliveries(World):
    """Two readers and one courier who does not use the LLM."""

    def setup(self, trips: int = 3) -> None:
        readers = [self.add(Reader(f"r{i}", persona=f"You are reader {i}.")) for i in range(2)]
        self.add(Courier("courier", [r.name for r in readers], every=2, trips=trips))


class Shipper(Agent):
    """Ships an order to ``customer`` every ``every`` time units; each takes ``transit`` to
    arrive (a delayed message: no courier process)."""

    calls_llm = False

    def __init__(self, name: str, customer: str, every: float, transit: float,
                 orders: int) -> None:
        super().__init__(name)
        self.customer, self.every, self.transit, self.orders = customer, every, transit, orders

    def run(self):
        for order in range(self.orders):
            yield self.wait(self.every)
            self.send(self.customer, f"order {order}", delay=self.transit)


class Shipping(World):
    """Shippers whose orders take days to arrive, and customers who ask the LLM on arrival."""

    def setup(self, customers: int = 2, transit: float = 5.0, orders: int = 2) -> None:
        for i in range(customers):
            customer = self.add(Reader(f"c{i}", persona=f"You are customer {i}."))
            self.add(Shipper(f"s{i}", customer.name, every=1 + i, transit=transit,
                             orders=orders))
