"""Agent memory in the modeled executor: objects that are only sizes."""

from __future__ import annotations

import torch

from runtime.memory.objects import AgentMemory, Tensors


class ModeledMemory(AgentMemory):
    """A memory object that is only a size: loads cost link time, a rebuild costs a prefill.

    ``origin="host"`` objects (adapters) always have a host copy; ``origin="recompute"`` objects
    (prefix KV) must be computed by the model the first time (``threadsafe = False`` makes the
    manager do that inline; :attr:`fresh` marks it so the next step that uses it charges the
    prefill).
    Once computed, an evicted prefix KV goes to the host tier when the manager has room there
    (``host_bytes``), and a later miss copies it back instead of recomputing it.
    """

    def __init__(self, key: str, nbytes: int, kind: str, origin: str) -> None:
        super().__init__(key, nbytes)
        self.kind = kind  # type: ignore[misc]
        self.origin = origin  # type: ignore[misc]
        self.threadsafe = origin != "recompute"  # type: ignore[misc]
        self.fresh = False

    def materialize(self) -> Tensors:
        if self.origin == "recompute":
            self.fresh = True  # the next step that uses it computes it (a prefill)
        return {}

    def preload(self) -> Tensors:
        # A size only: resident from the start means already computed (no prefill is charged).
        self.fresh = False
        return {}

    def device_tensors(self) -> Tensors:
        # A zero-size tensor stands for the computed KV: the manager counts nbytes, not its size.
        if self.origin == "recompute" and not self.fresh:
            return {"kv": torch.empty(0)}
        return {}
