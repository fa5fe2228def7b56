"""Per-agent prefix KV: the persona/system prefix computed once and reused on later calls.

A :class:`PrefixKV` is a first-class memory object: its key is the agent id, it remembers the
adapter and the exact prefix tokens it was computed for (the adapter changes k/v, so both must
match for a reuse), it owns a list of blocks in the :class:`~runtime.kv_cache.KVCache` and knows
its size in bytes. :meth:`PrefixKV.offload` copies its blocks to host memory and frees them;
:meth:`PrefixKV.reload` copies them back bit-identically; :meth:`PrefixKV.drop` frees them for
good (the next call re-prefills). These are the hooks a memory manager drives.

The last block of a prefix is usually only partly filled. A sequence that reuses the prefix
shares the full blocks (reference counts) but gets its own copy of the partial block, since it
writes its prompt tokens right after the prefix.

:class:`PrefixCache` maps agent ids to entries in least-recently-used order. Without a memory
manager its policy is simple: keep everything while it fits; when the pool runs out of blocks,
drop the least recently used entry (:meth:`PrefixCache.evict_one`). Under a
:class:`~runtime.memory.MemoryManager` (``managed = True``) every entry is created by the
executor as a :class:`~runtime.memory.engine_objects.PooledPrefix`, counted against the manager's
device budget and evicted only by it; :meth:`PrefixCache.register` then only fills entries the
manager made resident and never creates one behind its back.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from runtime.kv_cache import KVCache


@dataclass(eq=False)
class PrefixKV:
    """The cached KV of one agent's prefix."""

    key: str
    adapter: str | None
    token_ids: tuple[int, ...]
    blocks: list[int] = field(default_factory=list)
    host: tuple[torch.Tensor, torch.Tensor] | None = None
    last_used: int = 0
    block_nbytes: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def resident(self) -> bool:
        return bool(self.blocks)

    @property
    def nbytes(self) -> int:
        """Bytes the prefix occupies in the pool when resident."""
        return len(self.blocks or range(self._num_blocks)) * self.block_nbytes

    @property
    def _num_blocks(self) -> int:
        return 0 if self.host is None else self.host[0].shape[1]

    def matches(self, adapter: str | None, token_ids: list[int]) -> bool:
        return self.adapter == adapter and self.token_ids == tuple(token_ids)

    def offload(self, cache: KVCache) -> None:
        """Copy the blocks to host memory and give them back to the pool."""
        if self.blocks:
            self.host = cache.read(self.blocks)
            cache.release(self.blocks)
            self.blocks = []

    def reload(self, cache: KVCache) -> None:
        """Bring an offloaded prefix back into fresh blocks (raises OutOfBlocks if full)."""
        if self.host is not None and not self.blocks:
            self.blocks = cache.allocate(self._num_blocks)
            cache.write(self.blocks, *self.host)
            self.host = None

    def drop(self, cache: KVCache) -> None:
        """Forget the KV entirely; a later call recomputes it."""
        cache.release(self.blocks)
        self.blocks, self.host = [], None


class PrefixCache:
    """Agent id -> :class:`PrefixKV`, in least-recently-used order."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.entries: OrderedDict[str, PrefixKV] = OrderedDict()
        self._clock = itertools.count(1)
        #: entries belong to a memory manager: register fills them, never creates them
        self.managed = False

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.resident)

    def lookup(self, agent_id: str, adapter: str | None, token_ids: list[int]) -> PrefixKV | None:
        """The usable entry for this agent, prefix and adapter, or ``None``.

        A stale entry (the agent's prefix or adapter changed) is dropped. An offloaded entry is
        reloaded here: this is where the engine needs the prefix resident.
        """
        entry = self.entries.get(agent_id)
        if entry is None:
            return None
        if not entry.matches(adapter, token_ids):
            self.remove(agent_id)
            return None
        if not entry.resident:
            entry.reload(self.cache)
            if not entry.resident:
                return None
        entry.last_used = next(self._clock)
        self.entries.move_to_end(agent_id)
        return entry

    def attach(self, entry: PrefixKV) -> list[int]:
        """Blocks for a new sequence that starts with ``entry``'s tokens (see module doc)."""
        bs = self.cache.block_size
        full = entry.num_tokens // bs
        blocks = self.cache.share(entry.blocks[:full])
        if entry.num_tokens % bs:
            own = self.cache.allocate(1)[0]
            self.cache.copy_block(entry.blocks[full], own)
            blocks.append(own)
        return blocks

    def register(self, agent_id: str, adapter: str | None, token_ids: list[int],
                 block_table: list[int]) -> PrefixKV | None:
        """Cache the prefix a running sequence has just computed in its first blocks.

        An entry for the same prefix and adapter that holds no blocks (offloaded, or waiting to
        be recomputed under a manager) is filled in place; one that holds blocks is kept as is.
        A managed cache returns ``None`` for an agent without a matching entry.
        """
        entry = self.entries.get(agent_id)
        if entry is not None and entry.matches(adapter, token_ids):
            if not entry.blocks:
                entry.blocks = self._copy_prefix(block_table, len(token_ids))
                entry.host = None
            entry.last_used = next(self._clock)
            self.entries.move_to_end(agent_id)
            return entry
        if self.managed:
            return None
        self.remove(agent_id)
        entry = PrefixKV(agent_id, adapter, tuple(token_ids),
                         self._copy_prefix(block_table, len(token_ids)),
                         last_used=next(self._clock), block_nbytes=self.cache.block_nbytes)
        self.entries[agent_id] = entry
        return entry

    def _copy_prefix(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Share the full blocks of a computed prefix and copy its partial last block."""
        bs = self.cache.block_size
        full = num_tokens // bs
        own = self.cache.allocate(1) if num_tokens % bs else []  # first: may raise OutOfBlocks
        blocks = self.cache.share(block_table[:full])
        if own:
            self.cache.copy_block(block_table[full], own[0])
        return blocks + own

    def remove(self, agent_id: str) -> None:
        entry = self.entries.pop(agent_id, None)
        if entry is not None:
            entry.drop(self.cache)

    def evict_one(self) -> bool:
        """Drop the least recently used resident entry; ``False`` when there is none.

        Sequences that reuse an entry hold their own references to its blocks, so dropping it
        never disturbs a running request: this is where a memory manager may evict instead.
        """
        for agent_id, entry in self.entries.items():
            if entry.resident:
                self.remove(agent_id)
                return True
        return False
