"""The torch executor's agent memory: LoRA adapters and prefix KV that live in its pools.

The executor applies resident adapters from slots of its :class:`runtime.lora.LoraPool`.
:class:`PooledAdapter` hands the decision of which adapters hold a slot to the
:class:`MemoryManager`: a load copies the host weights (or, when the host budget let them go,
the adapter's file read again) through the copy engine, so the emulated link and prefetch
overlap apply, and then installs them into a slot; an eviction frees the slot.

:class:`PooledPrefix` does the same for an agent's prefix KV, which lives in blocks of the paged
KV pool (:class:`runtime.prefix_cache.PrefixEntry`). Its bytes are those blocks, counted against the
same device budget as the adapters. An eviction reads the blocks out (the manager keeps them on
the host or disk when its tiers allow) and frees them; a reload writes them into fresh blocks,
bit-identically. A persona KV with an identity (the executor gives one when the manager has a
persistent store) is also found in, and written to, that store. With no copy left the object is rebuilt by *recompute*: it becomes resident
empty ("pending"), the request that needed it prefills the prefix as part of its own prompt, and
the executor fills the entry with the blocks it just computed (:meth:`PrefixCache.fill`).
"""

from __future__ import annotations

from typing import Callable

from runtime.kv_cache import OutOfBlocks
from runtime.lora import LoraAdapter, LoraPool
from runtime.memory.objects import AgentMemory, Tensors
from runtime.prefix_cache import PrefixCache, PrefixEntry


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


class PooledPrefix(AgentMemory):
    """One agent's prefix KV entry of the executor's :class:`PrefixCache`, managed by the manager.

    The manager-owned :attr:`device` is always an empty dict when resident: the KV itself is in
    ``entry.blocks``, which are empty while the entry waits to be recomputed.
    """

    kind = "prefix_kv"
    origin = "recompute"
    threadsafe = False  # recomputing needs the model: only on the engine's thread

    def __init__(self, prefixes: PrefixCache, entry: PrefixEntry) -> None:
        cache = prefixes.cache
        super().__init__(f"prefix_kv:{entry.key}", cache.blocks_for(entry.num_tokens)
                         * cache.block_nbytes)
        self.prefixes = prefixes
        self.entry = entry

    def materialize(self) -> Tensors:
        return {}  # recompute: the request prefills the prefix itself (see the module doc)

    def on_device(self, tensors: Tensors) -> Tensors:
        entry, cache = self.entry, self.prefixes.cache
        if tensors and not entry.blocks:
            try:
                blocks = cache.allocate(cache.blocks_for(entry.num_tokens))
            except OutOfBlocks:
                return {}  # the pool is full of running sequences: recompute instead
            cache.write(blocks, tensors["k"], tensors["v"])
            entry.blocks = blocks
        return {}

    def device_tensors(self) -> Tensors:
        if not self.entry.blocks:
            return {}
        k, v = self.prefixes.cache.read(self.entry.blocks)
        return {"k": k, "v": v}

    def off_device(self) -> None:
        self.prefixes.cache.release(self.entry.blocks)
        self.entry.blocks = []
