"""Per-agent prefix KV in the paged pool: the persona/system prefix computed once and reused.

A :class:`PrefixEntry` remembers the adapter and the exact prefix tokens its KV was computed
for (the adapter changes k/v, so both must match for a reuse) and owns a list of blocks in the
:class:`~runtime.kv_cache.KVCache`. Entries belong to the memory manager: the torch executor
creates one per agent as a :class:`~runtime.executors.torch_memory.PooledPrefix`, the manager
decides when its blocks are on the device, and an entry without blocks is either evicted or
waiting to be recomputed by the request that needs it (:meth:`PrefixCache.fill`).

The last block of a prefix is usually only partly filled. A sequence that reuses the prefix
shares the full blocks (reference counts) but gets its own copy of the partial block, since it
writes its prompt tokens right after the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.kv_cache import KVCache


@dataclass(eq=False)
class PrefixEntry:
    """The cached KV of one agent's prefix (``blocks`` empty: not on the device now)."""

    key: str
    adapter: str | None
    token_ids: tuple[int, ...]
    blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def matches(self, adapter: str | None, token_ids: list[int]) -> bool:
        return self.adapter == adapter and self.token_ids == tuple(token_ids)


class PrefixCache:
    """Agent id -> :class:`PrefixEntry` over one KV pool."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.entries: dict[str, PrefixEntry] = {}

    def lookup(self, agent_id: str, adapter: str | None,
               token_ids: list[int]) -> PrefixEntry | None:
        """The agent's entry if it holds the KV of exactly this prefix and adapter."""
        entry = self.entries.get(agent_id)
        if entry is None or not entry.blocks or not entry.matches(adapter, token_ids):
            return None
        return entry

    def attach(self, entry: PrefixEntry) -> list[int]:
        """Blocks for a new sequence that starts with ``entry``'s tokens (see module doc)."""
        bs = self.cache.block_size
        full = entry.num_tokens // bs
        blocks = self.cache.share(entry.blocks[:full])
        if entry.num_tokens % bs:
            own = self.cache.allocate(1)[0]
            self.cache.copy_block(entry.blocks[full], own)
            blocks.append(own)
        return blocks

    def fill(self, agent_id: str, adapter: str | None, token_ids: list[int],
             block_table: list[int]) -> PrefixEntry | None:
        """Give the agent's empty entry the prefix a running sequence has just computed in its
        first blocks (raises :class:`~runtime.kv_cache.OutOfBlocks` when the pool is full).

        An entry that already holds blocks is kept as is; without a matching entry (the
        manager has not made one) nothing is cached and ``None`` is returned.
        """
        entry = self.entries.get(agent_id)
        if entry is None or not entry.matches(adapter, token_ids):
            return None
        if not entry.blocks:
            entry.blocks = self._copy_prefix(block_table, len(token_ids))
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
        """Forget the agent's entry and free its blocks."""
        entry = self.entries.pop(agent_id, None)
        if entry is not None:
            self.cache.release(entry.blocks)
            entry.blocks = []
