"""Which agent a request belongs to, and which adapter it asks for.

An agent's key decides whose memory objects (its persona-prefix KV, its adapter) the request
uses and whose distance hints apply to it. The first of these that is present wins:

1. the header ``X-ScaleSim-Agent``;
2. ``scalesim.agent`` in the body (the client's ``extra_body``);
3. ``prompt_cache_key``;
4. ``user``;
5. the adapter named in the ``model`` field (one adapter per agent is the common setup);
6. otherwise a hash of the first system message (agents differ by persona), ``sys-<hex>``.

:class:`AdapterRegistry` resolves the ``model`` field: the served base name, ``base:adapter``,
or a registered adapter name. Adapters are the PEFT-format directories under ``--adapters DIR``
(each subdirectory holding an ``adapter_config.json``), named by their directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from scalesim.serve.errors import APIError
from scalesim.serve.protocol import Message

AGENT_HEADER = "x-scalesim-agent"


@dataclass(frozen=True)
class Identity:
    """The resolved agent key and where it came from (written to the trace)."""

    agent: str
    source: str


@dataclass(frozen=True)
class ModelChoice:
    """What the ``model`` field named: the base model, or one adapter of it."""

    model: str
    adapter_name: str | None = None
    adapter_path: str | None = None


class AdapterRegistry:
    """The served model's name(s) and the adapters found under a directory."""

    def __init__(self, base_names: list[str], adapters_dir: str | Path | None = None) -> None:
        self.base_names = [n for n in base_names if n]
        self.adapters: dict[str, str] = {}
        if adapters_dir is not None:
            root = Path(adapters_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"--adapters {root}: no such directory")
            for child in sorted(root.iterdir()):
                if (child / "adapter_config.json").is_file():
                    self.adapters[child.name] = str(child.resolve())

    @property
    def base(self) -> str:
        return self.base_names[0]

    def model_ids(self) -> list[str]:
        """What ``/v1/models`` lists: the base model, then each adapter."""
        return [self.base, *self.adapters]

    def resolve(self, model: str) -> ModelChoice:
        """The choice ``model`` names; an unknown model or adapter is a 404."""
        base, sep, adapter = model.partition(":")
        if sep and base in self.base_names:
            return self._adapter(model, adapter)
        if model in self.base_names:
            return ModelChoice(model)
        if model in self.adapters:
            return self._adapter(model, model)
        raise APIError(404, f"The model '{model}' does not exist; served: "
                       f"{', '.join(self.model_ids())}", param="model", code="model_not_found")

    def _adapter(self, model: str, name: str) -> ModelChoice:
        path = self.adapters.get(name)
        if path is None:
            raise APIError(404, f"The adapter '{name}' (model '{model}') does not exist; "
                           f"adapters: {', '.join(self.adapters) or 'none'}",
                           param="model", code="model_not_found")
        return ModelChoice(model, name, path)


def resolve_identity(header: str | None, body_agent: str | None, prompt_cache_key: str | None,
                     user: str | None, choice: ModelChoice,
                     messages: list[Message] | None = None, prompt: str = "") -> Identity:
    """The agent key of a request, by the order in the module docstring."""
    for value, source in ((header, "header"), (body_agent, "scalesim.agent"),
                          (prompt_cache_key, "prompt_cache_key"), (user, "user"),
                          (choice.adapter_name, "model")):
        if value:
            return Identity(value.strip() or value, source)
    system = next((m.text() for m in messages or () if m.role in ("system", "developer")), None)
    if system is None:
        return Identity("anonymous", "default")
    digest = hashlib.sha256(system.encode("utf-8")).hexdigest()[:12]
    return Identity(f"sys-{digest}", "system_hash")
