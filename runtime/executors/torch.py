"""The real engine's executor: one paged forward pass per iteration over a mixed batch.

:class:`TorchExecutor` owns the model weights (:class:`~runtime.model.llama.LlamaModel`), the
paged KV pool, the prefix cache over it (:class:`~runtime.prefix_cache.PrefixTree`) and the LoRA
adapter pool. The :class:`~runtime.scheduler.BatchScheduler` decides which sequences run, how
many tokens each computes and what it reuses from the prefix cache;
:meth:`TorchExecutor.execute` lays those tokens out flat, runs the model once and samples one
token for every sequence whose chunk reached its end.

Memory: a request's adapter and the cached segments of its prefix are memory objects
(:mod:`runtime.executors.torch_memory`, :mod:`runtime.prefix_cache`) under the
:class:`~runtime.memory.MemoryManager`'s one device budget; the engine's admission pins them
before the scheduler attaches the prefix. A segment the manager dropped is recomputed by the
request's own prefill, which fills it again; the report's ``reprefill_tokens`` counts those
tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.constrained import GrammarMasks
from runtime.embedding import EmbeddingPass, check_ids
from runtime.kv_cache import KVCache, check_kv_cache_dtype
from runtime.lora import LoraBatch, LoraPool, adapter_fingerprint, load_adapter
from runtime.memory import AgentMemory, MemoryManager
from runtime.executors.base import ChatCodec
from runtime.executors.torch_memory import PooledAdapter
from runtime.model.attention import BatchLayout, select_attention
from runtime.interface import WallClock
from runtime.model.byte_chat import ByteChat
from runtime.model.chat import ChatFormat
from runtime.model.llama import LlamaModel
from runtime.model.profiles import ModelConfig, from_hf_config, profile
from runtime.model.weights import DENSE_FROM, check_quantization
from runtime.model.sampling import sample
from runtime.prefix_cache import PrefixTree, Segment, token_digest
from runtime.request import RequestError
from runtime.sequence import Batch, Sequence
from runtime.threads import configure as configure_threads


class TorchExecutor:
    """Paged KV, prefix reuse and multi-LoRA batching on one model, under ``memory``."""

    def __init__(self, memory: MemoryManager, model: str = "smollm2-135m", device: str = "cpu",
                 dtype: str = "float32", block_size: int = 16, kv_cache_tokens: int = 32768,
                 max_num_seqs: int = 64, max_batch_tokens: int = 512, max_lora_rank: int = 16,
                 attention: str = "auto", random_weights: bool = False, tokenizer: Any = None,
                 hf_model: Any = None, quantization: str = "none", linear: str = "auto",
                 quantized_dense_from: int = DENSE_FROM, threads: int | None = None,
                 prefix_cache: str = "tokens", kv_cache_dtype: str = "auto") -> None:
        torch_dtype = getattr(torch, dtype)
        check_kv_cache_dtype(kv_cache_dtype, torch.device(device), torch_dtype)
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
            from runtime.model.loader import Checkpoint, load_checkpoint, weights_fingerprint

            if hf_model is not None:  # share an already loaded transformers model (tests)
                checkpoint = Checkpoint(from_hf_config(hf_model.config), hf_model.state_dict(),
                                        tokenizer)
            else:
                # A quantized model is quantized from the float32 weights, not rounded ones.
                checkpoint = load_checkpoint(
                    model, dtype="float32" if quantization != "none" else dtype, device=device)
            self.config, tokenizer = checkpoint.config, checkpoint.tokenizer
            self.model = LlamaModel.from_tensors(checkpoint.tensors, self.config,
                                                 quantization=quantization, linear=linear,
                                                 dtype=torch_dtype, dense_from=quantized_dense_from)
            if memory.tiers.store is not None:
                self._weights = weights_fingerprint(self.config, checkpoint.tensors)
        self.dtype = dtype
        self.quantization = quantization
        self.tokenizer = tokenizer
        # Random weights without a tokenizer serve text as bytes (shape runs on any profile).
        self.chat: ChatCodec = (ChatFormat(tokenizer) if tokenizer is not None
                                else ByteChat(self.config.vocab_size, self.config.eos_token_ids))
        self.eos_token_ids = set(self.config.eos_token_ids)
        self.max_context = self.config.max_position_embeddings
        self.engine_clock = WallClock()
        self.architecture: ModelConfig | None = self.config
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device)
        c = self.config
        self.kv_cache_dtype = kv_cache_dtype
        self.cache = KVCache(c.num_layers, -(-kv_cache_tokens // block_size), block_size,
                             c.num_kv_heads, c.head_dim, dtype=torch_dtype, device=device,
                             quantized=kv_cache_dtype == "int8")
        self.prefixes = PrefixTree(self.cache, memory, identity=self._segment_identity,
                                   scope=prefix_cache)
        self.loras = LoraPool(c, max_lora_rank, torch_dtype, device)
        self.max_lora_rank = max_lora_rank
        self.memory = memory
        self._adapters: dict[str, PooledAdapter] = {}
        self._adapter_prints: dict[str, str] = {}
        self.attention = select_attention(self.cache, c.num_heads, c.num_kv_heads, c.head_dim,
                                          attention)
        #: constrained replies need the tokenizer's vocabulary (not the byte codec's)
        self.structured_output = tokenizer is not None
        self._grammar_masks: GrammarMasks | None = None

    # -- the executor protocol ----------------------------------------------------------------

    def validate(self, seq: Sequence) -> None:
        """Check at submission that ``seq`` can ever fit in the KV pool, and that its
        constraint (if any) compiles."""
        if seq.request.constraint is not None and self.structured_output:
            self._grammars().check(seq.request)
        needed = self.cache.blocks_for(seq.num_prompt_tokens + seq.request.sampling.max_tokens)
        if needed > self.cache.num_blocks:
            raise RequestError(
                f"request {seq.request_id} of agent {seq.request.agent_id!r}: "
                f"{seq.num_prompt_tokens} prompt tokens + max_tokens "
                f"{seq.request.sampling.max_tokens} need {needed} KV blocks, the pool has "
                f"{self.cache.num_blocks}")

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        """The memory objects ``seq`` needs resident while it runs: its adapter, then the cached
        segments of its prefix (in order)."""
        objects: list[AgentMemory] = []
        if seq.request.adapter is not None:
            objects.append(self._pooled_adapter(seq.request.adapter))
        objects += self.prefixes.path(seq)
        return objects

    @property
    def reprefill_tokens(self) -> int:
        """Prompt tokens computed again after their KV had been cached and lost."""
        return self.prefixes.recomputed_tokens

    def decode_horizon(self, seq: Sequence) -> int:
        return 1  # a real model may end any token: the engine looks after each one

    def report(self) -> dict[str, Any]:
        return {"engine": {"reprefill_tokens": self.reprefill_tokens,
                           "dtype": self.dtype,
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

    def _segment_identity(self, segment: Segment, token_ids: list[int]) -> dict[str, Any] | None:
        """What a prefix segment's KV is computed from: the persistent store's key (None: not
        stored). ``token_ids`` are the input from its start through the segment."""
        if self._weights is None:
            return None
        adapter = None if segment.adapter is None else self._adapter_prints[segment.adapter]
        return {"kind": "prefix_kv", "layout": "paged-kv-2", "weights": self._weights,
                "adapter": adapter, "dtype": self.dtype, "quantization": self.quantization,
                "kv_cache_dtype": self.kv_cache_dtype, "block_size": self.cache.block_size,
                "start": segment.start * self.cache.block_size,
                "num_tokens": len(token_ids), "tokens": token_digest(token_ids)}

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
        if sampled:
            rows = list(enumerate(sampled))
            if self._grammar_masks is not None:  # else no request was ever constrained
                self._mask(logits, rows)
            for seq, token in self._sample(logits, [(r, s) for r, s in rows if s.error is None]):
                seq.append_tokens([token])

    # Masking and sampling come after the batch's forward pass: an exception there would leave
    # every sequence computed and none sampled, so each row's failure is caught and fails that
    # sequence alone (the engine's bisection only reruns batches the executor left untouched).

    def _mask(self, logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> None:
        """Mask the constrained rows by their grammars, one row at a time if the batch fails."""
        assert self._grammar_masks is not None
        try:
            self._grammar_masks.mask_sequences(logits, rows)
            return
        except Exception:
            pass
        for row, seq in rows:
            try:
                self._grammar_masks.mask_sequences(logits, [(row, seq)])
            except Exception as exc:
                seq.fail(f"internal error while masking this request's reply by its "
                         f"constraint: {type(exc).__name__}: {exc}", internal=True)

    def _sample(self, logits: torch.Tensor, rows: list[tuple[int, Sequence]]
                ) -> list[tuple[Sequence, int]]:
        """A token for each ``(row, sequence)``; a row that cannot be sampled fails its
        sequence, and only it."""
        seqs = [s for _, s in rows]
        whole = len(rows) == logits.shape[0]  # no row failed before sampling: no copy
        try:
            tokens = sample(logits if whole else logits[[r for r, _ in rows]],
                            [s.request.sampling for s in seqs],
                            [self._generator(s) for s in seqs])
            return list(zip(seqs, tokens))
        except Exception:
            pass
        out: list[tuple[Sequence, int]] = []
        for row, seq in rows:
            try:
                out.append((seq, sample(logits[row:row + 1], [seq.request.sampling],
                                        [self._generator(seq)])[0]))
            except Exception as exc:
                seq.fail(f"internal error while sampling this request's next token: "
                         f"{type(exc).__name__}: {exc}", internal=True)
        return out

    def embedding_pass(self, input: str | list[int]) -> EmbeddingPass:
        """The pooled embedding of ``input`` (text, or token ids), to be stepped on the engine's
        thread; tokenizing here is safe on any thread (:mod:`runtime.embedding`)."""
        if isinstance(input, str):
            if isinstance(self.chat, ByteChat):  # random weights: text as bytes, as served
                ids = [self.chat.base + b for b in input.encode("utf-8", "surrogatepass")]
            else:
                ids = list(self.tokenizer(input, add_special_tokens=False)["input_ids"])
        else:
            ids = list(input)
        check_ids(ids, self.config.vocab_size, self.max_context)
        return EmbeddingPass(self.model, ids, self.max_batch_tokens)

    def _grammars(self) -> GrammarMasks:
        """The grammar masker, made at the first constrained request (reading the vocabulary
        takes about a second; unconstrained runs never pay it)."""
        if self._grammar_masks is None:
            self._grammar_masks = GrammarMasks.from_tokenizer(
                self.tokenizer, self.config.vocab_size, sorted(self.eos_token_ids))
        return self._grammar_masks

    def _adapter_slot(self, seq: Sequence) -> int | None:
        path = seq.request.adapter
        return None if path is None else self._adapters[path].adapter.slot

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """The sequence's own random generator when its request gives a seed (made once)."""
        seed = seq.request.sampling.seed
        if seed is not None and seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator
