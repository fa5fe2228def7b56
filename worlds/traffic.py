"""Gridlock: vehicles cross a road grid, asking the LLM which way to turn at each intersection.

The city is a networkx grid graph of intersections; every road has a length (km) and a speed
limit. A vehicle starts at a random intersection with a random destination; at each
intersection it asks the LLM one word — north, south, east or west, from the roads that exist —
given how many blocks away the destination lies. A reply that names no open road falls back to
the direction of a fewest-blocks path (and is counted). Driving a road takes length / speed, slowed down by
the other vehicles on it; a vehicle that has wandered for ``patience`` decisions on one trip
follows a fewest-blocks path without asking. After arriving it starts the next trip, ``trips`` in all.

Distance source it exercises: **timers from travel times** — the time a vehicle reaches its next
intersection (and asks next) is in the event queue the moment it enters a road.
"""

from __future__ import annotations

import networkx as nx

from agents import LLMAgent
from scalesim import World

Node = tuple[int, int]
HEADINGS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


def blocks(a: Node, b: Node) -> str:
    """Where ``b`` lies from ``a`` in words, e.g. '2 blocks north and 1 block east'."""
    parts = []
    for delta, pos, neg in ((b[1] - a[1], "north", "south"), (b[0] - a[0], "east", "west")):
        if delta:
            parts.append(f"{abs(delta)} block{'s' if abs(delta) > 1 else ''} "
                         f"{pos if delta > 0 else neg}")
    return " and ".join(parts) or "here"


class Vehicle(LLMAgent["Traffic"]):
    """Drives trip after trip, one LLM decision per intersection."""

    prompts = {
        **LLMAgent.prompts,
        # "Do you turn ...? Say the direction." gets SmolLM2-135M to name a direction most often.
        "choose": "{question} Do you turn {either}? Say the direction.",
        "turn": "Your destination is {where}.",
    }

    def __init__(self, name: str, persona: str, start: Node, trips: int, patience: int,
                 **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.at = start
        self.trips = trips
        self.patience = patience
        self.trip_minutes: list[float] = []
        self.decisions = self.autopilot = self.detours = 0

    def run(self):
        for _ in range(self.trips):
            goal = self.world.random_destination(self.at)
            started, asked = self.now, 0
            while self.at != goal:
                best = self.world.next_on_shortest_path(self.at, goal)
                if asked < self.patience:
                    asked += 1
                    self.decisions += 1
                    step = yield from self.decide(goal, best)
                else:
                    self.autopilot += 1
                    step = best
                if self.world.hops(step, goal) >= self.world.hops(self.at, goal):
                    self.detours += 1
                yield from self.drive(step)
            self.trip_minutes.append(self.now - started)

    def decide(self, goal: Node, best: Node):
        options = {h: (self.at[0] + dx, self.at[1] + dy) for h, (dx, dy) in HEADINGS.items()}
        options = {h: n for h, n in options.items() if self.world.roads.has_edge(self.at, n)}
        default = next(h for h, n in options.items() if n == best)
        heading = yield from self.choose(self.prompts["turn"].format(where=blocks(self.at, goal)),
                                         list(options), default=default)
        return options[heading]

    def drive(self, to: Node):
        road = self.world.roads.edges[self.at, to]
        road["vehicles"] += 1
        yield self.wait(self.world.travel_minutes(road))
        road["vehicles"] -= 1
        self.at = to


class Traffic(World):
    """The road grid, its vehicles, and travel times with congestion."""

    def setup(self, size: int = 3, vehicles: int = 4, trips: int = 2, patience: int = 6,
              congestion: float = 0.5, max_tokens: int = 8) -> None:
        if size < 2:
            raise ValueError(f"world.params.size must be >= 2, got {size}")
        self.congestion = congestion
        self.roads = nx.grid_2d_graph(size, size)
        for _, _, road in self.roads.edges(data=True):
            road["km"] = round(self.random.uniform(0.3, 1.0), 2)
            road["kmh"] = self.random.choice([30, 50, 50, 70])
            road["vehicles"] = 0
        nodes = list(self.roads.nodes)
        self.vehicles: list[Vehicle] = []
        for i in range(vehicles):
            persona = f"You are a {self.random.choice(['calm', 'hurried'])} taxi driver in a grid city."
            self.vehicles.append(self.add(Vehicle(
                f"car{i}", persona, self.random.choice(nodes), trips, patience,
                choice_tokens=max_tokens)))

    def travel_minutes(self, road: dict) -> float:
        """Free-flow time of ``road``, stretched by ``congestion`` per other vehicle on it."""
        return road["km"] / road["kmh"] * 60 * (1 + self.congestion * (road["vehicles"] - 1))

    def random_destination(self, start: Node) -> Node:
        return self.random.choice([n for n in self.roads.nodes if n != start])

    def hops(self, a: Node, b: Node) -> int:
        return abs(a[0] - b[0]) + abs(a[1] - b[1])

    def next_on_shortest_path(self, a: Node, b: Node) -> Node:
        """The next intersection on a path of fewest blocks from ``a`` to ``b``."""
        return nx.shortest_path(self.roads, a, b)[1]

    def metrics(self) -> dict:
        cars = self.vehicles
        trips = [m for c in cars for m in c.trip_minutes]
        return {**super().metrics(), "trips": len(trips),
                "mean_trip_minutes": round(sum(trips) / len(trips), 2) if trips else None,
                "decisions": sum(c.decisions for c in cars),
                "autopilot_moves": sum(c.autopilot for c in cars),
                "detours": sum(c.detours for c in cars)}
