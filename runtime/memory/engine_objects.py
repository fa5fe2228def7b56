"""The torch executor's own objects as agent memory: LoRA adapters living in the LoRA pool.

The executor keeps every adapter's weights on the host (:class:`runtime.lora.LoraAdapter`) and
applies resident ones from slots of its :class:`runtime.lora.LoraPool`. :class:`PooledAdapter`
hands the decision of which adapters hold a slot to the :class:`MemoryManager`: a load copies the
host weights through the copy engine (so the emulated link and prefetch overlap apply) and then
installs them into a slot; an eviction frees the slot (the host copy stays, so a reload is exact).
"""

from __future__ import annotations

from typing import Any

from runtime.lora import LoraAdapter
from runtime.memory.objects import AgentMemory, Tensors


class PooledAdapter(AgentMemory):
    """One adapter of the executor's :class:`~runtime.lora.LoraPool`, managed by the manager."""

    kind = "adapter"
    origin = "disk"

    def __init__(self, pool: Any, adapter: LoraAdapter) -> None:
        super().__init__(f"adapter:{adapter.key}", adapter.nbytes)
        self.pool = pool
        self.adapter = adapter
        self.host = self._flatten(adapter)  # the executor keeps host weights anyway

    @staticmethod
    def _flatten(adapter: LoraAdapter) -> Tensors:
        out: Tensors = {}
        for (layer, module), (a, b) in adapter.weights.items():
            out[f"{layer}.{module}.A"], out[f"{layer}.{module}.B"] = a, b
        return out

    def materialize(self) -> Tensors:
        return self._flatten(self.adapter)

    def on_device(self, tensors: Tensors) -> Tensors:
        weights = {(int(layer), module): (tensors[f"{layer}.{module}.A"],
                                          tensors[f"{layer}.{module}.B"])
                   for layer, module, _ in (k.split(".") for k in tensors if k.endswith(".A"))}
        staged = LoraAdapter(self.adapter.key, self.adapter.rank, weights)
        self.pool.load(staged)  # copies the transferred tensors into a free slot
        self.pool._owners[staged.slot] = self.adapter
        self.adapter.slot = staged.slot
        return {}  # the slot holds the weights now; the staging copy is freed

    def off_device(self) -> None:
        self.pool.offload(self.adapter)
