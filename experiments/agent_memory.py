"""The agent memory the measured experiments give their agents: personas and LoRA adapters.

A persona is an agent's stable prefix (its prefix KV is one memory object), an adapter its own
weights (another). :func:`persona` writes ~200 tokens of villager for agent ``i``;
:class:`AgentOutfit` is what every agent of a world gets in the memory-policy benchmarks, a
random adapter of its own and a persona padded to a length, handed to the world through its
``world.params`` (:class:`AdapterTown`, :class:`AdapterFeed`), so a run's configuration says all
it used. :meth:`AgentOutfit.measure` asks an engine what one agent's memory takes there, which
sizes the device budget of those benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.harness import serve_in_turn
from runtime.interface import EngineEvent, EngineInterface
from runtime.memory.events import MemoryEvent
from runtime.model.profiles import ModelConfig
from runtime.request import Request, SamplingParams
from scalesim.world import World
from worlds.social_feed import SocialFeed
from worlds.town import Town

TRAITS = ["patient", "curious", "stubborn", "generous", "anxious", "witty", "careful", "bold"]
JOBS = ["baker", "smith", "teacher", "fisher", "weaver", "farmer", "scribe", "healer"]
PLACES = ["the bakery", "the market", "the harbour", "the library", "the mill", "the tavern"]


def persona(i: int) -> str:
    """About 200 tokens of stable persona text for agent ``i``."""
    job, trait = JOBS[i % len(JOBS)], TRAITS[(i // len(JOBS)) % len(TRAITS)]
    place = PLACES[i % len(PLACES)]
    lines = [
        f"You are villager number {i}, a {trait} {job} who has lived in the small coastal town of "
        f"Maple Hollow for all of your life. You work most days near {place}.",
        "Your mornings start early: you open the shutters, greet the neighbours, and plan the "
        "day's work while the kettle boils. You remember the names of everyone who visits.",
        f"People describe you as {trait}. You care about your family, your craft as a {job}, and "
        "the traditions of the town, such as the spring fair and the autumn lantern walk.",
        "You speak plainly and warmly, in one or two short sentences, and you never break "
        "character. When asked about your plans you answer with concrete actions, places and "
        "people from the town. You keep a small notebook of promises you made to friends.",
        "Recent events: a storm damaged the pier, the mayor announced a new market day, and a "
        "travelling musician has been playing in the square every evening this week.",
    ]
    return " ".join(lines)


BACKSTORY = ("You grew up in Maple Hollow, know every family on the market square, keep a diary "
             "of the weather and the harvest, and remember who owes whom a favour. ")


def long_persona(persona: str, tokens: int) -> str:
    """``persona`` followed by enough backstory sentences for about ``tokens`` tokens."""
    return persona + " " + BACKSTORY * max(0, tokens // 36)  # a sentence is ~36 tokens


#: the modules a random adapter adapts (attention only: smaller than make_adapters' seven)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_adapter(path: Path, config: ModelConfig, rank: int, seed: int) -> str:
    """Write a PEFT adapter of ``rank`` with random ``A`` and ``B`` (std 0.02) under ``path``."""
    import torch
    from safetensors.torch import save_file

    from runtime.lora import module_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_layers):
        for module in MODULES:
            fan_in, fan_out = shapes[module]
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(MODULES)}))
    return str(path)


@dataclass(frozen=True)
class OutfitSizes:
    """What one agent's memory takes on an engine, as its memory manager counts it."""

    adapter_bytes: int
    persona_tokens: int
    persona_bytes: int

    def working_set(self, agents: int) -> int:
        """The bytes of ``agents`` agents' adapters and persona KV together."""
        return (self.adapter_bytes + self.persona_bytes) * agents


@dataclass
class AgentOutfit:
    """Every agent's own adapter and long persona (agent ``i`` gets adapter ``i % len``)."""

    adapters: list[str] = field(default_factory=list)
    #: the approximate persona length in tokens (0: the world's own persona, unpadded)
    persona_tokens: int = 0

    @classmethod
    def write(cls, work: Path, config: ModelConfig, agents: int, rank: int,
              persona_tokens: int) -> AgentOutfit:
        """One random adapter per agent, written under ``work`` (adapter ``i`` seeded ``i``)."""
        return cls([random_adapter(work / f"adapter{i}", config, rank, i) for i in range(agents)],
                   persona_tokens)

    def params(self) -> dict[str, Any]:
        """The ``world.params`` that give a world's agents this outfit (see :class:`AdapterTown`)."""
        return {"adapters": self.adapters, "persona_tokens": self.persona_tokens}

    def give(self, world: World) -> None:
        """Give each agent of a set-up ``world`` its adapter and its persona, made long."""
        for i, agent in enumerate(world.agents.values()):
            if self.adapters:
                agent.adapter = self.adapters[i % len(self.adapters)]
            agent.persona = long_persona(agent.persona, self.persona_tokens)

    def measure(self, engine: EngineInterface, sample: str) -> OutfitSizes:
        """What an agent with the first adapter and ``sample`` as persona takes on ``engine``.

        The engine says it: one agent calls twice. The memory event of its adapter's first load
        gives the adapter's bytes; the KV its first call leaves in the prefix cache (the
        manager's ``bytes_cached``) what the agent's persona and prompt take there; the cached
        tokens of its second call (the persona's KV reused) the persona's length in tokens.
        """
        adapter_bytes: list[int] = []

        def note(event: EngineEvent) -> None:
            if isinstance(event, MemoryEvent) and event.kind == "adapter":
                adapter_bytes.append(event.bytes)

        engine.listen(note)
        prefix = long_persona(sample, self.persona_tokens)
        calls = []
        for _ in range(2):
            calls += [done for _, _, done in serve_in_turn(
                engine, 1, 1, lambda agent, call: Request(
                    "outfit-probe", "Hi", prefix=prefix, adapter=self.adapters[0],
                    sampling=SamplingParams(max_tokens=1)))]
            if len(calls) == 1:
                cached_bytes = int(engine.report()["memory"]["bytes_cached"])
        return OutfitSizes(adapter_bytes[0], calls[-1].cached_tokens, cached_bytes)


class AdapterTown(Town):
    """The town: bursts of calls at the schedule's hours (every villager stops at 9:00, 13:00...)."""

    # Only the parameters the benchmarks set; the world's others keep their defaults.
    def setup(self, villagers: int = 8, max_tokens: int = 24,  # type: ignore[override]
              adapters: list[str] | None = None, persona_tokens: int = 0) -> None:
        super().setup(villagers=villagers, max_tokens=max_tokens)
        AgentOutfit(adapters or [], persona_tokens).give(self)


class AdapterFeed(SocialFeed):
    """social_feed: each hour a different ~20% of the users acts, drawn ahead in the event queue."""

    def setup(self, users: int = 10, max_tokens: int = 24,  # type: ignore[override]
              active_rate: float = 0.2, adapters: list[str] | None = None,
              persona_tokens: int = 0) -> None:
        super().setup(users=users, max_tokens=max_tokens, active_rate=active_rate)
        AgentOutfit(adapters or [], persona_tokens).give(self)


#: world name -> (``world.class``, its size parameter, simulated minutes of a full run)
WORLDS = {"town": ("experiments.agent_memory:AdapterTown", "villagers", 1320.0),
          "social_feed": ("experiments.agent_memory:AdapterFeed", "users", 1440.0)}
