"""Acme exchange on the fake engine: rotating call auctions, off-schedule news, price moves."""

import itertools

from fake_engine import run_world

from worlds.market import Market, percent

QUIET = 1e9  # news_every: no headline during the run


def side(auction: str, news: str = "hold"):
    return lambda r: news if "Breaking news" in r.prompt else auction


def test_percent_describes_the_move():
    assert percent(101.5, 100) == "up 1.5%"
    assert percent(98, 100) == "down 2.0%"
    assert percent(100.01, 100) == "unchanged"


def test_each_auction_asks_its_whole_group_at_once_and_clears():
    orders = itertools.cycle(["Buy.", "I sell.", "buy", "no idea", "hold"])
    world, engine = run_world(Market, {"traders": 12, "groups": 3, "period": 30,
                                       "news_every": QUIET}, 300,
                              reply=lambda r: next(orders))
    m = world.metrics()
    assert m["auctions"] == 9 and m["auction_orders"] == 9 * 4 == len(engine.requests)
    assert world.counters()["parse_fallbacks"] == 7  # "no idea" names no side: a hold
    for k, auction in enumerate(world.history):
        assert auction["time"] == 30 * (k + 1) and auction["group"] == k % 3
        callers = sorted(r.agent_id for t, r in zip(engine.times, engine.requests)
                         if t == auction["time"])
        assert callers == sorted(t.name for t in world.members[k % 3])
    # The second auction of a group reports the move since its first.
    later = [r.prompt for t, r in zip(engine.times, engine.requests) if t == 120]
    assert all("since your last auction" in p for p in later)
    assert any("down" in p or "up" in p for p in later)


def test_orders_move_the_price_and_are_matched():
    up, _ = run_world(Market, {"traders": 10, "groups": 2, "news_every": QUIET}, 200,
                      reply=side("Buy!"))
    assert up.price > up.open_price and up.metrics()["volume"] == 0  # nobody sells
    down, _ = run_world(Market, {"traders": 10, "groups": 2, "news_every": QUIET}, 200,
                        reply=side("sell"))
    assert down.price < down.open_price
    flat, _ = run_world(Market, {"traders": 10, "groups": 2, "news_every": QUIET}, 200,
                        reply=side("hold"))
    assert flat.price == flat.open_price and flat.metrics()["holds"] == 6 * 5


def test_auctions_conserve_shares_and_coins():
    orders = itertools.cycle(["buy", "sell", "buy", "hold", "sell"])
    world, _ = run_world(Market, {"traders": 40, "groups": 4, "news_every": QUIET}, 600,
                         reply=lambda r: next(orders))
    # Initial holdings are drawn at setup; rebuild them with the same seed.
    fresh, _ = run_world(Market, {"traders": 40, "groups": 4, "news_every": QUIET}, 1e-9)
    shares = sum(t.shares for t in world.traders)
    assert shares == sum(t.shares for t in fresh.traders)
    assert abs(sum(t.cash for t in world.traders) - sum(t.cash for t in fresh.traders)) < 1e-6
    assert world.metrics()["volume"] > 0
    assert all(t.shares >= 0 and t.cash >= 0 for t in world.traders)


def test_news_wakes_a_few_traders_off_schedule():
    world, engine = run_world(Market, {"traders": 30, "groups": 3, "period": 30,
                                       "news_every": 20, "news_reach": 4}, 600,
                              reply=side("hold", news="Sell, sell!"))
    m = world.metrics()
    assert m["news_items"] > 10 and m["news_reactions"] == 4 * m["news_items"]
    news = [(t, r.agent_id) for t, r in zip(engine.times, engine.requests)
            if "Breaking news" in r.prompt]
    assert len(news) == m["news_reactions"]
    assert sum(t % 30 != 0 for t, _ in news) > 0.9 * len(news)  # between auctions
    assert {t for t, _ in news} == {t for t, _ in world.news}
    # Headlines arrive by message from the newswire; the reactions sell and move the price.
    assert all(world.graph.has_edge("newswire", a) for _, a in news)
    assert m["news_trades"] > 0 and world.price < world.open_price


def test_seeded_runs_are_reproducible():
    def calls(seed):
        _, engine = run_world(Market, {"traders": 20, "groups": 4}, 480, seed=seed,
                              reply=side("buy", news="sell"))
        return [(t, r.agent_id, r.prompt) for t, r in zip(engine.times, engine.requests)]

    assert calls(1) == calls(1)
    assert calls(1) != calls(2)
