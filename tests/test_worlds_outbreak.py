"""Fever town on the fake engine: rare thinking, spreading fever and news, answers that matter."""

import networkx as nx
from fake_engine import run_world

from worlds.outbreak import DAY, NEWS, Outbreak


def answer(fever: str, news: str):
    return lambda r: fever if "fever and a cough" in r.prompt else news


def is_news(prompt: str) -> bool:
    return "Is this news true?" in prompt


def test_most_wakeups_make_no_llm_call():
    world, engine = run_world(Outbreak, {"people": 300, "contacts": 8}, 7 * DAY,
                              reply=answer("No.", "Yes, it is true."))
    m = world.metrics()
    assert m["llm_calls"] == len(engine.requests) > 0
    assert m["wakeups"] > 10 * m["llm_calls"]
    assert m["thinking_share"] < 0.1
    # Every wake-up is an outing or a visit; a visit is a message.
    assert m["outings"] + m["outings_skipped"] <= m["wakeups"]
    assert m["wakeups"] <= m["outings"] + m["outings_skipped"] + m["visits"]
    assert m["interactions"] == m["visits"]
    # A call is about fresh news or new symptoms, each at most once per person and item.
    asked = [(r.agent_id, r.prompt) for r in engine.requests]
    assert len(asked) == len(set(asked))
    assert all(is_news(p) or "fever and a cough" in p for _, p in asked)


def test_fever_spreads_and_symptoms_come_after_incubation():
    world, engine = run_world(Outbreak, {"people": 300, "transmission": 0.2,
                                         "seed_infections": 5}, 10 * DAY, reply=["no"])
    m = world.metrics()
    assert m["infections"] > 20 and m["recovered"] > 0
    fever = [t for t, r in zip(engine.times, engine.requests) if "fever and a cough" in r.prompt]
    assert len(fever) > 10
    # Seeds were infected up to a day before the start; symptoms begin two days after infection.
    assert min(fever) >= 2 * DAY - DAY
    assert all(p.asked_about_fever == (p.calls > 0) for p in world.people
               if p.infected_at is not None and not p.heard)


def test_staying_home_skips_outings_and_slows_the_fever():
    params = {"people": 300, "transmission": 0.2, "seed_infections": 5, "seed_news": 0}
    home, _ = run_world(Outbreak, params, 12 * DAY, reply=answer("Yes.", "no"))
    out, _ = run_world(Outbreak, params, 12 * DAY, reply=answer("No.", "no"))
    assert home.metrics()["stayed_home"] > 0 and home.metrics()["outings_skipped"] > 0
    assert out.metrics()["stayed_home"] == 0 and out.metrics()["outings_skipped"] == 0
    assert home.metrics()["infections"] < out.metrics()["infections"]
    # Nobody visits someone who stays home.
    stay = next(p for p in home.people if p.staying_home)
    neighbour = home.people[next(iter(home.contacts[stay.index]))]
    assert all(stay not in home.visitable(neighbour, 100) for _ in range(5))


def test_believed_news_spreads_and_doubted_news_does_not():
    params = {"people": 200, "seed_news": 2, "news_reach": 3, "seed_infections": 0}
    doubted, engine = run_world(Outbreak, params, 5 * DAY, reply=["No, that is silly."])
    assert sum(is_news(r.prompt) for r in engine.requests) == 2 * 3  # only the radio listeners
    believed, engine = run_world(Outbreak, params, 5 * DAY, reply=["Yes!"])
    judged = sum(is_news(r.prompt) for r in engine.requests)
    assert judged > 50 and believed.metrics()["news_believers"][0] > 50
    assert NEWS[0][1] == "careful"
    careful = [p for p in believed.people if 0 in p.believed]
    assert careful and all(p.meetings in (1, believed.meetings + 2) for p in careful)


def test_answers_that_name_neither_count_as_fallbacks():
    world, engine = run_world(Outbreak, {"people": 50, "seed_news": 2}, 2 * DAY,
                              reply=["Hmm, maybe."])
    m = world.metrics()
    assert world.counters()["parse_fallbacks"] == len(engine.requests) > 0
    assert m["news_believers"] == [0, 0]


def test_contact_graph_is_connected_and_small_world():
    world, _ = run_world(Outbreak, {"people": 500, "contacts": 10, "rewiring": 0.1}, 1)
    g = world.contacts
    assert nx.is_connected(g) and g.number_of_nodes() == 500
    assert sum(d for _, d in g.degree()) == 500 * 10
    assert nx.average_shortest_path_length(g) < 6


def test_seeded_runs_are_reproducible():
    def calls(seed):
        world, engine = run_world(Outbreak, {"people": 120}, 6 * DAY, seed=seed,
                                  reply=answer("yes", "no"))
        return [(t, r.agent_id, r.prompt) for t, r in zip(engine.times, engine.requests)], \
            world.metrics()

    assert calls(3) == calls(3)
    assert calls(3)[0] != calls(4)[0]
