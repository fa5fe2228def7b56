"""The real engine's executor: one paged forward pass per iteration over a mixed batch.

:class:`TorchExecutor` owns the model weights (:class:`~runtime.model.llama.LlamaModel`), the
paged KV pool, the per-agent prefix KV cache and the LoRA adapter pool. The
:class:`~runtime.scheduler.BatchScheduler` decides which sequences run and how many tokens each
computes; :meth:`TorchExecutor.execute` lays those tokens out flat, runs the model once, samples
one token for every sequence whose chunk reached its end, and caches a sequence's prefix KV as
soon as the prefix has been computed.

Memory: a request's adapter and its agent's prefix KV are memory objects
(:mod:`runtime.executors.torch_memory`) under the :class:`~runtime.memory.MemoryManager`'s one
device budget; the engine's admission pins them before the scheduler looks up the prefix. A
prefix KV the manager dropped is recomputed by the request's own prefill, and the executor then
fills the entry; :attr:`TorchExecutor.reprefill_tokens` counts prefix tokens computed again.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

import torch

from runtime.kv_cache import KVCache, OutOfBlocks
from runtime.lora import LoraBatch, LoraPool, adapter_fingerprint, load_adapter
from runtime.memory import AgentMemory, MemoryManager
from runtime.executors.base import ChatCodec
from runtime.executors.torch_memory import PooledAdapter, PooledPrefix
from runtime.model.attention import BatchLayout, select_attention
from runtime.interface import WallClock
from runtime.model.chat import ChatFormat
from runtime.model.llama import LlamaModel
from runtime.model.profiles import ModelConfig, from_hf_config, profile
from runtime.model.weights import DENSE_FROM, check_quantization
from runtime.model.sampling import sample
from runtime.prefix_cache import PrefixCache, PrefixEntry
from runtime.request import RequestError
from runtime.sequence import Batch, Sequence
from runtime.threads import configure as configure_threads


class NoTokenizer:
    """The chat of a random-weights model built without a tokenizer: it can take no text."""

    def encode(self, prefix: str, prompt: str) -> tuple[list[int], list[int]]:
        raise RequestError("this engine has random weights and no tokenizer: it serves no text")

    def decode(self, token_ids: list[int]) -> str:
        return ""


class TorchExecutor:
    """Paged KV, prefix reuse and multi-LoRA batching on one model, under ``memory``."""

    def __init__(self, memory: MemoryManager, model: str = "smollm2-135m", device: str = "cpu",
                 dtype: str = "float32", block_size: int = 16, kv_cache_tokens: int = 32768,
                 max_num_seqs: int = 64, max_batch_tokens: int = 512, max_lora_rank: int = 16,
                 attention: str = "auto", random_weights: bool = False, tokenizer: Any = None,
                 hf_model: Any = None, quantization: str = "none", linear: str = "auto",
                 quantized_dense_from: int = DENSE_FROM, threads: int | None = None) -> None:
        torch_dtype = getattr(torch, dtype)
        #: torch's CPU threads (None on an accelerator)
        self.threads: int | None = None
        if torch.device(device).type == "cpu":
            self.threads = configure_threads(threads)
        check_quantization(quantization, torch.device(device), torch_dtype)
        #: what the model's KV depends on, for the persistent store (None: nothing is stored)
        self._weights: str | None = None
        if random_weights:
            # Shape-only runs: a built-in profile with random weights; a tokenizer is optional.
            self.config: ModelConfig = profile(model)
            self.model = LlamaModel.random(self.config, dtype=torch_dtype, device=device,
                                           quantization=quantization)
        else:
            if hf_model is None:  # else: share an already loaded transformers model (tests)
                from runtime.model.loader import load_hf_model

                # A quantized model is quantized from the float32 weights, not rounded ones.
                hf_model, tokenizer = load_hf_model(
                    model, dtype="float32" if quantization != "none" else dtype, device=device)
            self.config = from_hf_config(hf_model.config)
            self.model = LlamaModel.from_hf(hf_model, self.config, quantization=quantization,
                                            linear=linear, dtype=torch_dtype,
                                            dense_from=quantized_dense_from)
            if memory.tiers.store is not None:
                from runtime.model.loader import weights_fingerprint

                self._weights = weights_fingerprint(hf_model)
        self.dtype = dtype
        self.quantization = quantization
        self.tokenizer = tokenizer
        self.chat: ChatCodec = ChatFormat(tokenizer) if tokenizer is not None else NoTokenizer()
        self.eos_token_ids = set(self.config.eos_token_ids)
        self.max_context = self.config.max_position_embeddings
        self.engine_clock = WallClock()
        self.architecture: ModelConfig | None = self.config
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device)
        c = self.config
        self.cache = KVCache(c.num_layers, -(-kv_cache_tokens // block_size), block_size,
                             c.num_kv_heads, c.head_dim, dtype=torch_dtype, device=device)
        self.prefixes = PrefixCache(self.cache)
        self.loras = LoraPool(c, max_lora_rank, torch_dtype, device)
        self.max_lora_rank = max_lora_rank
        self.memory = memory
        #: prefix tokens computed for a prefix that had been computed before (repairs, preemptions)
        self.reprefill_tokens = 0
        self._prefilled: set[tuple[str, str | None, int]] = set()
        self._adapters: dict[str, PooledAdapter] = {}
        self._adapter_prints: dict[str, str] = {}
        self._prefix_objects: dict[str, PooledPrefix] = {}
        self.attention = select_attention(self.cache, c.num_heads, c.num_kv_heads, c.head_dim,
                                          attention)

    # -- the executor protocol ----------------------------------------------------------------

    def validate(self, seq: Sequence) -> None:
        """Check at submission that ``seq`` can ever fit in the KV pool."""
        needed = self.cache.blocks_for(seq.num_prompt_tokens + seq.request.sampling.max_tokens)
        if needed > self.cache.num_blocks:
            raise RequestError(
                f"request {seq.request_id} of agent {seq.request.agent_id!r}: "
                f"{seq.num_prompt_tokens} prompt tokens + max_tokens "
                f"{seq.request.sampling.max_tokens} need {needed} KV blocks, the pool has "
                f"{self.cache.num_blocks}")

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        """The memory objects ``seq`` needs resident while it runs: adapter, then prefix KV."""
        objects: list[AgentMemory] = []
        if seq.request.adapter is not None:
            objects.append(self._pooled_adapter(seq.request.adapter))
        if seq.prefix_ids:
            objects.append(self._pooled_prefix(seq))
        return objects

    def decode_horizon(self, seq: Sequence) -> int:
        return 1  # a real model may end any token: the engine looks after each one

    def report(self) -> dict[str, Any]:
        return {"engine": {"reprefill_tokens": self.reprefill_tokens, "dtype": self.dtype,
                           "quantization": self.quantization,
                           "attention": type(self.attention).__name__,
                           "threads": self.threads}}

    def _pooled_adapter(self, path: str) -> PooledAdapter:
        pooled = self._adapters.get(path)
        if pooled is None:
            pooled = PooledAdapter(self.loras, load_adapter(path, self.config, self.max_lora_rank),
                                   lambda: load_adapter(path, self.config, self.max_lora_rank))
            if self._weights is not None:
                self._adapter_prints[path] = adapter_fingerprint(path)
            self._adapters[path] = pooled
        return pooled

    def _prefix_identity(self, entry: PrefixEntry) -> dict[str, Any] | None:
        """What a persona KV is computed from: the persistent store's key (None: not stored)."""
        if self._weights is None:
            return None
        adapter = None if entry.adapter is None else self._adapter_prints[entry.adapter]
        tokens = hashlib.sha256(array("i", entry.token_ids).tobytes()).hexdigest()
        return {"kind": "prefix_kv", "layout": "paged-kv-1", "weights": self._weights,
                "adapter": adapter, "dtype": self.dtype, "quantization": self.quantization,
                "block_size": self.cache.block_size,
                "num_tokens": entry.num_tokens, "tokens": tokens}

    def _pooled_prefix(self, seq: Sequence) -> PooledPrefix:
        """The agent's prefix KV object; a new one when its prefix or adapter changed."""
        agent, adapter = seq.request.agent_id, seq.request.adapter
        obj = self._prefix_objects.get(agent)
        if obj is not None and not obj.entry.matches(adapter, seq.prefix_ids):
            try:
                self.memory.forget(obj)
            except RuntimeError:
                raise RequestError(f"request {seq.request_id} of agent {agent!r}: its prefix or "
                                   "adapter changed while a call with the old one runs") from None
            self.prefixes.entries.pop(agent, None)
            obj = None
        if obj is None:
            entry = PrefixEntry(agent, adapter, tuple(seq.prefix_ids))
            self.prefixes.entries[agent] = entry
            obj = self._prefix_objects[agent] = PooledPrefix(self.prefixes, entry)
            obj.identity = self._prefix_identity(entry)
        return obj

    def execute(self, batch: Batch) -> None:
        """Compute each sequence's ``chunk`` of tokens; sample where a chunk reaches the end."""
        seqs = batch.seqs
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq in seqs:
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
        layout = BatchLayout([s.chunk for s in seqs], [s.num_computed for s in seqs],
                             [s.block_table for s in seqs])
        self.attention.plan(layout)
        lora = LoraBatch.plan(self.loras, layout.q_lens, [self._adapter_slot(s) for s in seqs])
        logits = self.model.forward(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
            torch.tensor(slots, device=dev), self.cache, self.attention, lora,
            torch.tensor(sample_rows, device=dev, dtype=torch.long))
        for seq in seqs:
            seq.num_computed += seq.chunk
            seq.chunk = 0
            if seq.prefix_ids and not seq.prefix_cached and seq.num_computed >= len(seq.prefix_ids):
                self._cache_prefix(seq)
        if sampled:
            tokens = sample(logits, [s.request.sampling for s in sampled],
                            [self._generator(s) for s in sampled])
            for seq, token in zip(sampled, tokens):
                seq.append_tokens([token])

    def _adapter_slot(self, seq: Sequence) -> int | None:
        path = seq.request.adapter
        return None if path is None else self._adapters[path].adapter.slot

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """The sequence's own random generator when its request gives a seed (made once)."""
        seed = seq.request.sampling.seed
        if seed is not None and seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator

    def _cache_prefix(self, seq: Sequence) -> None:
        """The prefix of ``seq`` has just been computed: fill its agent's prefix entry."""
        computed = (seq.request.agent_id, seq.request.adapter, hash(tuple(seq.prefix_ids)))
        if computed in self._prefilled:
            self.reprefill_tokens += len(seq.prefix_ids)
        self._prefilled.add(computed)
        try:
            self.prefixes.fill(seq.request.agent_id, seq.request.adapter, seq.prefix_ids,
                               seq.block_table)
        except OutOfBlocks:
            pass  # not cached this time; the next call of the agent computes it again
        seq.prefix_cached = True
