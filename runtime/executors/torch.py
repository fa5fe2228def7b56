"""The real engine's executor: one paged forward pass per iteration over a mixed batch.

:class:`TorchExecutor` owns the model weights (:class:`~runtime.model.llama.LlamaModel`), the
paged KV pool, the per-agent prefix KV cache and the LoRA adapter pool. The
:class:`~runtime.scheduler.BatchScheduler` decides which sequences run and how many tokens each
computes; :meth:`TorchExecutor.execute` lays those tokens out flat, runs the model once, samples
one token for every sequence whose chunk reached its end, and caches a sequence's prefix KV as
soon as the prefix has been computed.

Memory: with a :class:`~runtime.memory.MemoryManager` attached, a request's adapter and its
agent's prefix KV are memory objects (:mod:`runtime.memory.engine_objects`) under one device
budget; the engine pins them when the scheduler admits the request, before the prefix lookup. A
prefix KV the manager dropped is recomputed by the request's own prefill, and the executor then
fills the entry; :attr:`TorchExecutor.reprefill_tokens` counts prefix tokens computed again.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.kv_cache import KVCache, OutOfBlocks
from runtime.lora import LoraBatch, LoraPool
from runtime.model.attention import BatchLayout, select_attention
from runtime.model.chat import ChatFormat
from runtime.model.llama import LlamaModel
from runtime.model.profiles import ModelConfig, from_hf_config, profile
from runtime.model.sampling import sample
from runtime.prefix_cache import PrefixCache
from runtime.request import RequestError
from runtime.sequence import Sequence


class TorchExecutor:
    """Paged KV, prefix reuse and multi-LoRA batching on one model."""

    def __init__(self, model: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32",
                 block_size: int = 16, kv_cache_tokens: int = 32768, max_num_seqs: int = 64,
                 max_batch_tokens: int = 512, max_lora_rank: int = 16, attention: str = "auto",
                 random_weights: bool = False, tokenizer: Any = None,
                 hf_model: Any = None) -> None:
        torch_dtype = getattr(torch, dtype)
        if random_weights:
            # Shape-only runs: a built-in profile with random weights; a tokenizer is optional.
            self.config: ModelConfig = profile(model)
            self.model = LlamaModel.random(self.config, dtype=torch_dtype, device=device)
        else:
            if hf_model is None:  # else: share an already loaded transformers model (tests)
                from runtime.model.loader import load_hf_model

                hf_model, tokenizer = load_hf_model(model, dtype=dtype, device=device)
            self.config = from_hf_config(hf_model.config)
            self.model = LlamaModel.from_hf(hf_model, self.config)
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer) if tokenizer is not None else None
        self.eos_token_ids = set(self.config.eos_token_ids)
        self.max_context = self.config.max_position_embeddings
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device)
        c = self.config
        self.cache = KVCache(c.num_layers, -(-kv_cache_tokens // block_size), block_size,
                             c.num_kv_heads, c.head_dim, dtype=torch_dtype, device=device)
        self.prefixes = PrefixCache(self.cache)
        self.loras = LoraPool(c, max_lora_rank, torch_dtype, device)
        self.max_lora_rank = max_lora_rank
        self.memory: Any = None  # a runtime.memory.MemoryManager, once attached
        #: the engine lets the manager pin prefix KV at admission (see Engine.attach_memory)
        self.prefix_memory = True
        #: prefix tokens computed for a prefix that had been computed before (repairs, preemptions)
        self.reprefill_tokens = 0
        self._prefilled: set[tuple[str, str | None, int]] = set()
        self.attention = select_attention(self.cache, c.num_heads, c.num_kv_heads, c.head_dim,
                                          attention)

    def prepare(self, seq: Sequence) -> None:
        """Check at submission that ``seq`` can ever run, and make its adapter resident."""
        needed = self.cache.blocks_for(seq.num_prompt_tokens + seq.request.sampling.max_tokens)
        if needed > self.cache.num_blocks:
            raise RequestError(
                f"request {seq.request_id} of agent {seq.request.agent_id!r}: "
                f"{seq.num_prompt_tokens} prompt tokens + max_tokens "
                f"{seq.request.sampling.max_tokens} need {needed} KV blocks, the pool has "
                f"{self.cache.num_blocks}")
        if self.memory is not None:
            objects = self.memory_objects(seq)  # the manager loads them; a stale prefix goes now
            if seq.request.adapter is not None:
                seq.adapter = objects[0].adapter
        elif seq.request.adapter is not None:
            adapter, was_resident = self.loras.get(seq.request.adapter)
            seq.adapter = adapter
            (seq.memory.hits if was_resident else seq.memory.misses)["adapter"] = 1
        if seq.request.sampling.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.request.sampling.seed)

    # -- memory manager hooks (runtime.memory) ---------------------------------------------

    def attach_memory(self, manager: Any) -> None:
        """Let ``manager`` decide which adapters hold LoRA slots and which prefixes stay cached;
        start with none resident."""
        for adapter in list(self.loras.adapters.values()):
            self.loras.offload(adapter)
        for agent in list(self.prefixes.entries):
            self.prefixes.remove(agent)
        self.prefixes.managed = True
        self.memory = manager
        self.reprefill_tokens = 0  # counted per manager, so runs under different ones compare
        self._prefilled.clear()
        self._pooled: dict[str, Any] = {}
        self._pooled_prefixes: dict[str, Any] = {}

    def _pooled_adapter(self, path: str) -> Any:
        from runtime.lora import load_adapter
        from runtime.memory.engine_objects import PooledAdapter

        if path not in self._pooled:
            adapter = self.loras.adapters.get(path)
            if adapter is None:
                adapter = load_adapter(path, self.config, self.max_lora_rank)
                self.loras.adapters[path] = adapter
            self._pooled[path] = self.memory.register(PooledAdapter(self.loras, adapter))
        return self._pooled[path]

    def _pooled_prefix(self, seq: Sequence) -> Any:
        """The agent's prefix KV object; a new one when its prefix or adapter changed."""
        from runtime.memory.engine_objects import PooledPrefix
        from runtime.prefix_cache import PrefixKV

        agent, adapter = seq.request.agent_id, seq.request.adapter
        obj = self._pooled_prefixes.get(agent)
        if obj is not None and not obj.entry.matches(adapter, seq.prefix_ids):
            try:
                self.memory.forget(obj)
            except RuntimeError:
                raise RequestError(f"request {seq.request_id} of agent {agent!r}: its prefix or "
                                   "adapter changed while a call with the old one runs") from None
            self.prefixes.entries.pop(agent, None)
            obj = None
        if obj is None:
            entry = PrefixKV(agent, adapter, tuple(seq.prefix_ids),
                             block_nbytes=self.cache.block_nbytes)
            self.prefixes.entries[agent] = entry
            obj = self._pooled_prefixes[agent] = self.memory.register(
                PooledPrefix(self.prefixes, entry), [agent])
        return obj

    def memory_objects(self, seq: Sequence) -> list[Any]:
        """The memory objects ``seq`` needs resident while it runs: adapter, then prefix KV."""
        objects = []
        if seq.request.adapter is not None:
            objects.append(self._pooled_adapter(seq.request.adapter))
        if seq.prefix_ids:
            objects.append(self._pooled_prefix(seq))
        return objects

    def execute(self, batch: list[Sequence]) -> None:
        """Compute each sequence's ``chunk`` of tokens; sample where a chunk reaches the end."""
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq in batch:
            start, n = seq.num_computed, seq.chunk
            tokens = seq.all_token_ids
            ids += tokens[start:start + n]
            pos = range(start, start + n)
            positions += pos
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in pos]
            if start + n == len(tokens):
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        dev = self.device
        layout = BatchLayout([s.chunk for s in batch], [s.num_computed for s in batch],
                             [s.block_table for s in batch])
        self.attention.plan(layout)
        lora = LoraBatch.plan(self.loras, layout.q_lens,
                              [s.adapter.slot if s.adapter is not None else None for s in batch])
        logits = self.model.forward(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
            torch.tensor(slots, device=dev), self.cache, self.attention, lora,
            torch.tensor(sample_rows, device=dev, dtype=torch.long))
        for seq in batch:
            seq.num_computed += seq.chunk
            seq.chunk = 0
            if seq.prefix_ids and not seq.prefix_cached and seq.num_computed >= len(seq.prefix_ids):
                computed = (seq.request.agent_id, seq.request.adapter, hash(tuple(seq.prefix_ids)))
                if computed in self._prefilled:
                    self.reprefill_tokens += len(seq.prefix_ids)
                self._prefilled.add(computed)
                try:
                    self.prefixes.register(seq.request.agent_id, seq.request.adapter,
                                           seq.prefix_ids, seq.block_table)
                except OutOfBlocks:
                    pass  # not cached this time; the next call of the agent computes it again
                seq.prefix_cached = True
        if sampled:
            tokens = sample(logits, [s.request.sampling for s in sampled],
                            [s.generator for s in sampled])
            for seq, token in zip(sampled, tokens):
                seq.append_tokens([token])

