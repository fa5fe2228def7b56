"""Chirp: an OASIS-like social network where posts spread as cascades over a follower graph.

Users follow each other on a scale-free graph (networkx Barabási-Albert: a few hubs with many
followers). Sim time is minutes; the day is split into steps (an hour by default). In each step a
user is active with a probability that follows the hour of the day (low at night, peaks at
lunch and in the evening; about ``active_rate`` on average). An active user reads the newest post
of those it follows and answers yes or no to sharing it (a share is a repost, or a reply with
probability ``reply_share``); otherwise it writes a post of its own with probability
``post_rate``. A post lands in its followers' feeds, so a few seed posts by hubs spread as repost/reply cascades. A user whose
post gets a reply is notified by message and may wake early to answer.

Distance sources it exercises: **sparse timers** (each user's next active step is drawn in
advance and sits in the event queue: only ~20% of users act per step) and the **interaction
graph** (a notified user wakes on ``receive()`` before its timer).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass

import networkx as nx

from agents import LLMAgent
from scalesim import World

#: Relative activity by hour of day (scaled so that the mean equals ``active_rate``).
HOURLY = [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 0.9, 1.1, 1.0, 1.0, 1.2,
          1.6, 1.3, 1.0, 1.0, 1.1, 1.3, 1.5, 1.7, 1.8, 1.6, 1.0, 0.5]

INTERESTS = ["football", "cooking", "climate", "movies", "startups", "gardening", "music",
             "politics", "cats", "travel", "space", "books"]
STYLES = ["enthusiastic", "sarcastic", "thoughtful", "brief", "curious", "grumpy"]
SEED_NEWS = [
    "BREAKING: the city will close the old bridge for a year.",
    "A local bakery gives away free bread all weekend!",
    "Scientists spot a new comet visible tonight.",
    "The football final goes to penalties tomorrow.",
]


@dataclass(frozen=True)
class Post:
    id: int
    author: str
    text: str
    time: float
    root: int            # the post that started this cascade
    parent: int | None   # the post reposted or replied to
    kind: str            # "post", "repost", "reply" or "seed"


class User(LLMAgent["SocialFeed"]):
    """A user wakes on its active steps, reads its feed and acts; a reply to it wakes it early."""

    prompts = {
        **LLMAgent.prompts,
        # SmolLM2-135M answers yes/no questions parseably; "which action" questions it does not.
        "share": "Your feed: {author}: \"{text}\"\nDo you want to share it with your followers?",
        "post": "Write a one-sentence social media post about {topic}.",
        "reply": "{author} posted: \"{text}\"\nWrite a one-sentence reply.",
    }

    def __init__(self, name: str, persona: str, interest: str, **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.interest = interest
        self.feed: deque[Post] = deque(maxlen=20)
        self.activations = 0

    def run(self):
        while True:
            wake = self.world.next_active(self.now)
            if wake is None:
                return
            message = yield self.receive(timeout=wake - self.now)
            if message is None:
                self.activations += 1
                yield from self.act()
            elif self.world.random.random() < self.world.answer_rate:
                self.activations += 1
                post = message.content
                text = yield from self.say(self.prompts["reply"].format(
                    author=post.author, text=post.text))
                self.world.publish(self, text, kind="reply", parent=post)

    def act(self):
        """Read the newest post of the feed: share it (repost or reply) or not; maybe post."""
        world = self.world
        newest = self.feed[-1] if self.feed else None
        self.feed.clear()
        if newest is not None:
            share = yield from self.choose(self.prompts["share"].format(
                author=newest.author, text=newest.text), ["yes", "no"], default="no")
            if share == "yes":
                if world.random.random() < world.reply_share:
                    text = yield from self.say(self.prompts["reply"].format(
                        author=newest.author, text=newest.text))
                    world.publish(self, text, kind="reply", parent=newest)
                else:
                    world.publish(self, newest.text, kind="repost", parent=newest)
                return
        if world.random.random() < world.post_rate:
            text = yield from self.say(self.prompts["post"].format(topic=self.interest))
            world.publish(self, text, kind="post")


class SocialFeed(World):
    """The follower graph, the posts, and the hour-of-day activity clock."""

    def setup(self, users: int = 10, attach: int = 2, active_rate: float = 0.2,
              step_minutes: float = 60, seed_posts: int = 2, answer_rate: float = 0.5,
              reply_share: float = 0.3, post_rate: float = 0.3, temperature: float = 0.9,
              max_tokens: int = 24) -> None:
        if users < attach + 1:
            raise ValueError(f"world.params.users must exceed attach ({attach}), got {users}")
        self.step_minutes = step_minutes
        self.answer_rate = answer_rate
        self.reply_share = reply_share
        self.post_rate = post_rate
        scale = active_rate / (sum(HOURLY) / len(HOURLY))
        self.hourly = [min(1.0, h * scale) for h in HOURLY]
        ba = nx.barabasi_albert_graph(users, attach, seed=self.seed)
        # ``follows`` has an edge u -> v when u follows v: newer users follow older ones (the hubs),
        # and a third of those follows are returned.
        self.follows = nx.DiGraph()
        for u, v in ba.edges:
            new, old = max(u, v), min(u, v)
            self.follows.add_edge(f"u{new}", f"u{old}")
            if self.random.random() < 1 / 3:
                self.follows.add_edge(f"u{old}", f"u{new}")
        self.posts: list[Post] = []
        self._ids = itertools.count()
        self.users: dict[str, User] = {}
        for i in range(users):
            interest = INTERESTS[i % len(INTERESTS)]
            style = self.random.choice(STYLES)
            persona = (f"You are user u{i} on a social network. You are {style} and you care "
                       f"about {interest}. Keep it short.")
            # Sampling, not greedy: a greedy 135M model answers every yes/no question the same.
            self.users[f"u{i}"] = self.add(User(f"u{i}", persona, interest, max_tokens=max_tokens,
                                                 temperature=temperature))
        hubs = sorted(self.users, key=lambda n: -self.follows.in_degree(n))
        for i in range(seed_posts):
            self.publish(self.users[hubs[i % len(hubs)]], SEED_NEWS[i % len(SEED_NEWS)], "seed")

    def next_active(self, now: float) -> float | None:
        """The start of the user's next active step after ``now`` (drawn here), or ``None``."""
        minutes, hourly, draw = self.step_minutes, self.hourly, self.random.random
        step = int(now // minutes) + 1
        # Draw step by step; the cap keeps a near-zero rate from looping for long.
        for s in range(step, step + 24 * 60):
            if draw() < hourly[int(s * minutes // 60) % 24]:
                return s * minutes
        return None

    def publish(self, author: User, text: str, kind: str, parent: Post | None = None) -> Post:
        post = Post(next(self._ids), author.name, text, self.now,
                    parent.root if parent else len(self.posts), parent.id if parent else None,
                    kind)
        self.posts.append(post)
        for follower in self.follows.predecessors(author.name):
            self.users[follower].feed.append(post)
        if parent is not None and parent.author != author.name:
            self.record_interaction(author.name, parent.author)
            if kind == "reply":
                author.send(parent.author, post)
        return post

    def metrics(self) -> dict:
        kinds = Counter(p.kind for p in self.posts)
        cascades = Counter(p.root for p in self.posts)
        activations = sum(u.activations for u in self.users.values())
        steps = max(self.now / self.step_minutes, 1) * len(self.agents)
        return {**super().metrics(), "posts": kinds["post"], "reposts": kinds["repost"],
                "replies": kinds["reply"], "largest_cascade": max(cascades.values(), default=0),
                "activations": activations, "active_share": round(activations / steps, 3)}
