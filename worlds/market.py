"""Acme exchange: traders quote in call auctions held for one group at a time; news hits in between.

Traders trade one stock, Acme. They are split into ``groups`` groups; every ``period`` minutes a
call auction is held for the next group in turn, so each group meets every ``groups * period``
minutes. At its auction every trader of the group asks the LLM for its order (buy, sell or hold
one share, given the price, its move since the group's last auction and the trader's holdings),
and once every order is in (or after ``window`` minutes) the auction clears: the price moves by
``impact`` times the order imbalance (as a share of the group), and buy and sell orders are
matched at the new price — the longer side is rationed at random. A reply that names no order
is a hold; an order the trader cannot carry out (a buy without the cash, a sell without a share)
is not filled. The market never closes: a run needs ``sim.until``.

Out of schedule, a newswire (an agent that never calls the LLM) sends a headline at random times
(on average every ``news_every`` minutes) to ``news_reach`` random traders. A trader who gets one
wakes at once and asks the LLM how it reacts; a buy or a sell is filled at once by a market maker
and moves the price as one share of imbalance would in an auction.

Distance sources it exercises: a **schedule with a wide fan-in** (a whole group's receive
deadlines fall on the same minute, and each trader's next auction is ``groups * period`` ahead)
and **unscheduled messages** (the newswire's next headline is a timer, but whom it reaches is
drawn only when it is sent).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import simpy

from agents import LLMAgent
from scalesim import Agent, World

HEADLINES = [
    "Acme wins a big contract with the city.",
    "Acme's factory burns down.",
    "Acme's new phone sells out in one day.",
    "Acme's chief executive resigns.",
    "A rival cuts its prices below Acme's.",
    "Acme pays its shareholders a large dividend.",
    "Acme recalls thousands of faulty heaters.",
    "The central bank cuts interest rates.",
]

STYLES = ["cautious", "bold", "trend-following", "contrarian", "nervous", "patient"]
SIDES = ["buy", "sell", "hold"]


def percent(new: float, old: float) -> str:
    change = (new / old - 1) * 100
    if abs(change) < 0.05:
        return "unchanged"
    return f"{'up' if change > 0 else 'down'} {abs(change):.1f}%"


@dataclass
class Auction:
    """One group's call auction: the orders in so far, and whether it has cleared."""

    index: int
    group: int
    size: int
    full: simpy.Event
    orders: dict[str, str] = field(default_factory=dict)
    cleared: bool = False

    def submit(self, trader: "Trader", side: str) -> None:
        if self.cleared:
            return  # too late: the window closed
        self.orders[trader.name] = side
        if len(self.orders) == self.size and not self.full.triggered:
            self.full.succeed()


class Trader(LLMAgent["Market"]):
    """Sleeps until its group's next auction; a headline wakes it earlier."""

    prompts = {
        **LLMAgent.prompts,
        # An "Options: ... Answer:" list gets SmolLM2-135M to name an order most often (about
        # half the time; "Do you buy, sell or hold?" less): a reply naming none is a hold.
        "choose": "{question}\nOptions: {options}\nAnswer:",
        "auction": ("The auction opens. Acme trades at {price:.1f} coins, {move} since your last "
                    "auction. You own {shares} shares and {cash:.0f} coins."),
        "news": ("Breaking news: {headline} Acme trades at {price:.1f} coins. You own {shares} "
                 "shares and {cash:.0f} coins."),
    }

    def __init__(self, name: str, persona: str, group: int, shares: int, cash: float,
                 **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.group = group
        self.next_auction = group  # index of the group's next auction
        self.last_price: float | None = None
        self.shares = shares
        self.cash = cash
        self.quotes = self.reactions = 0

    def run(self):
        world = self.world
        while True:
            # A reply that takes simulated time may end after the auction opened: go at once.
            opens = world.auction_time(self.next_auction)
            message = yield self.receive(timeout=max(0.0, opens - self.now))
            if message is None:  # our group's auction opens
                auction = world.auction(self.next_auction)
                self.next_auction += world.groups
                side = yield from self.decide(self.prompts["auction"].format(
                    price=world.price, move=percent(world.price, self.last_price or world.price),
                    shares=self.shares, cash=self.cash))
                self.last_price = world.price
                self.quotes += 1
                auction.submit(self, side)
            else:
                side = yield from self.decide(self.prompts["news"].format(
                    headline=message.content, price=world.price, shares=self.shares,
                    cash=self.cash))
                self.reactions += 1
                world.trade_now(self, side)

    def decide(self, question: str):
        return (yield from self.choose(question, SIDES, default="hold"))

    def can(self, side: str, price: float) -> bool:
        return (side == "buy" and self.cash >= price) or (side == "sell" and self.shares > 0)

    def fill(self, side: str, price: float) -> None:
        sign = 1 if side == "buy" else -1
        self.shares += sign
        self.cash -= sign * price


class Newswire(Agent["Market"]):
    """Sends a headline to a few random traders now and then; never asks the LLM."""

    def run(self):
        world = self.world
        while True:
            yield self.wait(world.random.expovariate(1 / world.news_every))
            headline = world.random.choice(HEADLINES)
            world.news.append((self.now, headline))
            for trader in world.random.sample(world.traders, min(world.news_reach,
                                                                 len(world.traders))):
                self.send(trader, headline)


class Market(World):
    """The traders, their groups, the auction schedule, the price and the order book."""

    def setup(self, traders: int = 6, groups: int = 2, period: float = 30, window: float = 5,
              impact: float = 0.1, price: float = 100.0, news_every: float = 60,
              news_reach: int = 2, temperature: float = 0.9, max_tokens: int = 8) -> None:
        if not 1 <= groups <= traders:
            raise ValueError(f"world.params.groups must be 1..traders ({traders}), got {groups}")
        self.groups = groups
        self.period = period
        self.window = window
        self.impact = impact
        self.price = self.open_price = self.high = self.low = price
        self.news_every = news_every
        self.news_reach = news_reach
        self.traders: list[Trader] = []
        self.members: list[list[Trader]] = [[] for _ in range(groups)]
        self._auctions: dict[int, Auction] = {}
        self.history: list[dict] = []   # one row per cleared auction
        self.news: list[tuple[float, str]] = []
        self.news_trades = 0
        for i in range(traders):
            group = i % groups
            persona = (f"You are a {self.random.choice(STYLES)} trader on a small stock "
                       "exchange. You trade shares of Acme.")
            trader = Trader(f"t{i}", persona, group, shares=self.random.randint(0, 6),
                            cash=round(self.random.uniform(200, 1000)), temperature=temperature,
                            choice_tokens=max_tokens)
            self.traders.append(trader)
            self.members[group].append(trader)
            self.add(trader)
        self.add(Newswire("newswire"))
        self.env.process(self.auctioneer())

    def auction_time(self, index: int) -> float:
        """When auction ``index`` opens: one auction per period, the first after one period."""
        return (index + 1) * self.period

    def auction(self, index: int) -> Auction:
        if index not in self._auctions:
            group = index % self.groups
            self._auctions[index] = Auction(index, group, len(self.members[group]),
                                            self.env.event())
        return self._auctions[index]

    def auctioneer(self):
        for index in itertools.count():
            yield self.env.timeout(self.auction_time(index) - self.now)
            auction = self.auction(index)
            yield auction.full | self.env.timeout(self.window)
            self.clear(auction)

    def clear(self, auction: Auction) -> None:
        """Move the price by the order imbalance and match buys with sells at the new price."""
        auction.cleared = True
        del self._auctions[auction.index]
        by_name = {t.name: t for t in self.members[auction.group]}
        sides = {s: [by_name[n] for n, side in auction.orders.items() if side == s]
                 for s in SIDES}
        price = self.move(auction.size, len(sides["buy"]) - len(sides["sell"]))
        buyers = [t for t in sides["buy"] if t.can("buy", price)]
        sellers = [t for t in sides["sell"] if t.can("sell", price)]
        volume = min(len(buyers), len(sellers))
        for trader in self.random.sample(buyers, volume):
            trader.fill("buy", price)
        for trader in self.random.sample(sellers, volume):
            trader.fill("sell", price)
        self.history.append({"time": self.now, "group": auction.group,
                             "orders": len(auction.orders), "buys": len(sides["buy"]),
                             "sells": len(sides["sell"]), "holds": len(sides["hold"]),
                             "volume": volume, "price": round(price, 4)})

    def trade_now(self, trader: Trader, side: str) -> None:
        """A market maker fills one share off-schedule; it moves the price as in an auction."""
        if side == "hold" or not trader.can(side, self.price):
            return
        trader.fill(side, self.price)
        self.move(len(self.members[trader.group]), 1 if side == "buy" else -1)
        self.news_trades += 1

    def move(self, size: int, imbalance: int) -> float:
        self.price *= math.exp(self.impact * imbalance / max(size, 1))
        self.high, self.low = max(self.high, self.price), min(self.low, self.price)
        return self.price

    def metrics(self) -> dict:
        h = self.history
        return {**super().metrics(), "traders": len(self.traders), "auctions": len(h),
                "auction_orders": sum(a["orders"] for a in h),
                "buys": sum(a["buys"] for a in h), "sells": sum(a["sells"] for a in h),
                "holds": sum(a["holds"] for a in h), "volume": sum(a["volume"] for a in h),
                "news_items": len(self.news),
                "news_reactions": sum(t.reactions for t in self.traders),
                "news_trades": self.news_trades, "open_price": self.open_price,
                "price": round(self.price, 2), "high": round(self.high, 2),
                "low": round(self.low, 2)}
