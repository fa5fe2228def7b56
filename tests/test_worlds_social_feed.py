"""Chirp on the fake engine: sparse activity, feeds, cascades, early wake-ups by reply."""

import itertools

import networkx as nx
from fake_engine import run_world

from worlds.social_feed import SocialFeed


def chatty(request):
    if "Do you want to share it" in request.prompt:
        return next(chatty.actions)
    return "So true!"


def test_activity_is_sparse_and_posts_cascade():
    chatty.actions = itertools.cycle(["Yes!", "yes, sure", "No.", "shrug"])
    world, engine = run_world(SocialFeed, {"users": 60, "active_rate": 0.2}, 1440, reply=chatty)
    m = world.metrics()
    assert 0.1 < m["active_share"] < 0.35
    assert m["posts"] > 0 and m["reposts"] > 0 and m["replies"] > 0
    assert m["largest_cascade"] > 2
    assert world.counters()["parse_fallbacks"] > 0          # "shrug" is neither yes nor no
    assert all(r.sampling.temperature > 0 for r in engine.requests)
    # Scale-free: the best-followed user has far more followers than the median one.
    degrees = sorted(d for _, d in world.follows.in_degree())
    assert degrees[-1] >= 4 * max(degrees[len(degrees) // 2], 1)
    assert nx.is_weakly_connected(world.follows)


def test_night_hours_are_quieter_than_the_evening():
    chatty.actions = itertools.cycle(["no"])
    world, engine = run_world(SocialFeed, {"users": 300}, 1440, reply=chatty)
    by_hour = [0] * 24
    for t in engine.times:
        by_hour[int(t // 60) % 24] += 1
    assert sum(by_hour[1:5]) * 3 < sum(by_hour[18:22])


def test_seed_posts_come_from_hubs():
    world, _ = run_world(SocialFeed, {"users": 30, "seed_posts": 2}, 1)
    seeds = [p for p in world.posts if p.kind == "seed"]
    top = max(world.follows.in_degree(), key=lambda nd: nd[1])[0]
    assert len(seeds) == 2 and seeds[0].author == top
