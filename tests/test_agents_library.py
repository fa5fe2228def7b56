"""The agents library: reply parsing, memory retrieval, choose/say fallbacks, reflection, talks."""

import pytest
from fake_engine import FakeEngine, run_world

from agents import Conversation, LLMAgent, MemoryStream, parse_fallbacks, pick, reflections
from scalesim import World


@pytest.mark.parametrize("text,expected", [
    ("Left.", "left"), ("I'd go LEFT now", "left"), ("right or left", "right"),
    ("straight", "straight"), ("leftover", None), ("", None), ("the town hall", "town hall"),
])
def test_pick_finds_the_first_named_option(text, expected):
    assert pick(text, ["left", "right", "straight", "town", "town hall"]) == expected


def test_memory_retrieval_prefers_recent_important_and_relevant():
    stream = MemoryStream(half_life=10)
    stream.add(0, "ate bread")
    stream.add(0, "saw a terrible fire at the mill")        # salient: important
    stream.add(50, "walked past the pond")                  # recent
    stream.add(1, "the baker sells rye bread")
    top = [m.text for m in stream.retrieve(now=50, k=2)]
    assert "walked past the pond" in top and "saw a terrible fire at the mill" in top
    assert stream.retrieve(now=50, k=1, query="rye bread")[0].text == "the baker sells rye bread"


def test_memory_capacity_forgets_the_least_useful():
    stream = MemoryStream(capacity=3)
    for t in range(5):
        stream.add(t, f"note {t}")
    assert len(stream) == 3 and stream.items[-1].text == "note 4"


def test_reflection_is_due_every_n_observations():
    stream = MemoryStream(reflect_every=2)
    stream.add(0, "a")
    assert not stream.reflection_due
    stream.add(0, "b")
    assert stream.reflection_due
    stream.reflected()
    assert not stream.reflection_due


class Chooser(LLMAgent):
    def run(self):
        self.picked = []
        for _ in range(3):
            self.picked.append((yield from self.choose("Where?", ["north", "south"], "south")))
            self.observe(f"went {self.picked[-1]}")
            yield from self.maybe_reflect()
        self.line = yield from self.say("Say something.")


class OneAgent(World):
    def setup(self):
        self.add(Chooser("c", "You are C.", reflect_every=2))


def test_choose_falls_back_and_counts_unparseable_replies():
    replies = iter(["North!", "banana", "I learned that south is fine", "no idea", "", "x"])
    world, engine = run_world(OneAgent, {}, None, reply=lambda r: next(replies))
    agent = world.agent("c")
    # Replies: North!, banana (fallback), [reflection], no idea (fallback), say "" -> fallback.
    assert agent.picked == ["north", "south", "south"]
    assert agent.parse_fallbacks == 3 and parse_fallbacks(world) == 3
    assert reflections(world) == 1
    assert agent.memory.items[2].kind == "reflection"
    assert agent.line == "..."
    assert all(r.prefix == "You are C." for r in engine.requests)
    assert engine.requests[0].sampling.max_tokens == 8
    assert engine.requests[0].prompt.endswith("north or south.")


class Talker(LLMAgent):
    def run(self):
        message = yield self.receive(timeout=5)
        talk = Conversation.of(message)
        if talk is not None:
            yield from talk.join(self)


class Host(LLMAgent):
    def run(self):
        guests = [self.world.agent(n) for n in self.world.guest_names]
        self.talk = Conversation([self, *guests], lines_each=2, place="park", patience=3)
        self.talk.invite(self)
        yield from self.talk.join(self)


class Gathering(World):
    def setup(self, guests: int = 2, absent: bool = False):
        self.guest_names = [f"g{i}" for i in range(guests)]
        self.add(Host("host", "You host."))
        for name in self.guest_names:
            self.add((Absent if absent else Talker)(name, "You are a guest."))


class Absent(LLMAgent):
    def run(self):
        yield self.wait(100)


def test_conversation_takes_turns_in_order_with_the_transcript():
    world, engine = run_world(Gathering, {"guests": 2}, None, reply=lambda r: f"hi from {r.agent_id}")
    talk = world.agent("host").talk
    assert [who for who, _ in talk.transcript] == ["host", "g0", "g1"] * 2
    assert talk.over and talk.turns.closed
    assert "host: hi from host" in engine.requests[1].prompt    # g0 saw what the host said
    assert world.graph.has_edge("host", "g0") and world.graph.has_edge("host", "g1")
    assert any("hi from g1" in m.text for m in world.agent("host").memory.items)


def test_conversation_ends_when_a_guest_never_comes():
    world, engine = run_world(Gathering, {"guests": 1, "absent": True}, None)
    talk = world.agent("host").talk
    assert [who for who, _ in talk.transcript] == ["host"]
    assert talk.over and world.env.now >= 3
