"""The torch executor's LoRA adapters, which live in its adapter pool, as memory objects.

The executor applies resident adapters from slots of its :class:`runtime.lora.LoraPool`.
:class:`PooledAdapter` hands the decision of which adapters hold a slot to the
:class:`MemoryManager`: a load copies the host weights (or, when the host budget let them go,
the adapter's file read again) through the copy engine, so the emulated link and prefetch
overlap apply, and then installs them into a slot; an eviction frees the slot. (Prefix KV, the
other kind the executor keeps, is the prefix cache's segments: :mod:`runtime.prefix_cache`.)
"""

from __future__ import annotations

from typing import Callable

from runtime.lora import LoraAdapter, LoraPool
from runtime.memory.objects import AgentMemory, Tensors


class PooledAdapter(AgentMemory):
    """One adapter of the executor's :class:`~runtime.lora.LoraPool`, managed by the manager.

    The weights read when the adapter was first named arrive as its host copy, which the
    manager counts against the host budget or lets go; ``reload`` reads them from the adapter's
    files again. :attr:`adapter` holds no weights, only the pool slot.
    """

    kind = "adapter"
    origin = "disk"

    def __init__(self, pool: LoraPool, adapter: LoraAdapter,
                 reload: Callable[[], LoraAdapter]) -> None:
        super().__init__(f"adapter:{adapter.key}", adapter.nbytes)
        self.pool = pool
        self.adapter = LoraAdapter(adapter.key, adapter.rank, {})
        self._reload = reload
        self.host = self._flatten(adapter)

    @staticmethod
    def _flatten(adapter: LoraAdapter) -> Tensors:
        out: Tensors = {}
        for (layer, module), (a, b) in adapter.weights.items():
            out[f"{layer}.{module}.A"], out[f"{layer}.{module}.B"] = a, b
        return out

    def materialize(self) -> Tensors:
        return self._flatten(self._reload())

    def on_device(self, tensors: Tensors) -> Tensors:
        weights = {(int(layer), module): (tensors[f"{layer}.{module}.A"],
                                          tensors[f"{layer}.{module}.B"])
                   for layer, module, _ in (k.split(".") for k in tensors if k.endswith(".A"))}
        staged = LoraAdapter(self.adapter.key, self.adapter.rank, weights)
        self.pool.load(staged, owner=self.adapter)  # copies the tensors into a free slot
        return {}  # the slot holds the weights now; the staging copy is freed

    def off_device(self) -> None:
        self.pool.offload(self.adapter)
