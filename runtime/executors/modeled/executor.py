"""The modeled executor: the real scheduler and memory manager, with time from a cost model.

:class:`ModeledExecutor` allocates no tensors. Tokenization only counts
(:mod:`~runtime.executors.modeled.chat`), a step appends placeholder tokens and advances the
:class:`~runtime.executors.modeled.link.VirtualClock` by the
:class:`~runtime.cost_model.CostModel`'s step time, and the agents' memory objects (a LoRA adapter
and the persona-prefix KV per agent) are sizes that the :class:`~runtime.memory.MemoryManager`
moves between tiers with its real policies, over the virtual link. It is built by
:func:`runtime.build_engine` exactly like the torch executor: the same scheduler, admission and
manager, with a different clock.

The *modeled makespan* (:attr:`ModeledExecutor.now`) is the modeled serving time of the whole run:
the sum of step times plus the stalls that compute did not hide. LLM calls still take zero
simulated time in the world; the two clocks are separate on purpose.

Prefix KV is the real engine's prefix cache (:class:`~runtime.prefix_cache.PrefixTree`) over a
sizing-only :class:`~runtime.kv_cache.KVCache`: the same matching, insertion, splitting and
leaf-first eviction, with segments that are sizes (:class:`~runtime.prefix_cache.SizedSegment`,
``kv_bytes_per_token`` of the model profile per token). A request computes only the tokens after
its match, and the step is charged for those; an evicted segment moves to the host tier when the
manager has room there (``host_bytes``), and a later miss copies it back over the link instead of
recomputing it. Adapters always have a host copy. The pool holds the running sequences' blocks
and the cached segments' (a block shared by both is counted once), so it is sized from the device
memory left after the weights, the agent-memory budget included.
"""

from __future__ import annotations

import math
from collections import abc
from typing import Any

from runtime.cost_model import CostModel, SeqWork
from runtime.executors.modeled.chat import FILLER, LengthChat, ReplayChat
from runtime.executors.modeled.link import ModeledCopyEngine, VirtualClock
from runtime.executors.modeled.objects import ModeledMemory
from runtime.kv_cache import KVCache
from runtime.memory import AgentMemory, MemoryManager
from runtime.prefix_cache import PrefixTree, SizedSegment
from runtime.model.profiles import ModelConfig
from runtime.request import RequestError
from runtime.sequence import Batch, Sequence


class ModeledEngineClock:
    """The engine's clock of a modeled executor: its virtual clock, in modeled seconds."""

    modeled = True

    def __init__(self, clock: VirtualClock, link: ModeledCopyEngine) -> None:
        self._clock, self._link = clock, link

    def now(self) -> float:
        return self._clock.now

    def wait_until(self, t: float) -> None:
        """Idle until modeled time ``t`` (engine replicas wait for the slowest one at the end
        of each iteration); the link goes on copying meanwhile."""
        if t > self._clock.now:
            self._clock.now = t
            self._link.advance(t)


class ModeledExecutor:
    """An executor with no tensors: see the module docstring.

    ``model`` names the model profile ``config`` and ``cost`` is the cost model of it on one
    hardware profile; ``link`` is the virtual link the manager copies on, whose clock is the
    executor's. ``lora_rank`` is the rank of each
    agent's own adapter (0: no adapters), ``managed`` which kinds of agent memory exist
    (``adapter``, ``prefix_kv``), ``output_tokens`` how many tokens each call generates (at most
    its ``max_tokens``). ``kv_cache_tokens=None`` sizes the KV pool from the device memory left
    after weights and the agent-memory budget. ``chat`` replaces the placeholder replies with a
    :class:`ReplayChat`. ``prefix_cache`` is the prefix cache's scope
    (:data:`runtime.prefix_cache.SCOPES`).
    """

    def __init__(self, memory: MemoryManager, link: ModeledCopyEngine, model: str,
                 config: ModelConfig, cost: CostModel, *, lora_rank: int = 0,
                 managed: tuple[str, ...] = ("adapter", "prefix_kv"),
                 prefix_tokens: int | None = None, output_tokens: int = 32,
                 chars_per_token: float = 4.0, max_num_seqs: int = 256,
                 max_batch_tokens: int = 8192, block_size: int = 16,
                 kv_cache_tokens: int | None = None,
                 replies: abc.Sequence[str] | abc.Mapping[str, abc.Sequence[str]] = ("ok",),
                 chat: ReplayChat | None = None, prefix_cache: str = "tokens") -> None:
        for kind in managed:
            if kind not in ("adapter", "prefix_kv"):
                raise ValueError(f"managed memory kind {kind!r}: choose adapter, prefix_kv")
        if output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
        self.memory, self.link, self.config, self.cost = memory, link, config, cost
        self.clock: VirtualClock = link.clock
        self.engine_clock = ModeledEngineClock(self.clock, link)
        self.model_name, self.hardware_name = model, cost.hw.name
        self.chat: LengthChat | ReplayChat = chat or LengthChat(
            chars_per_token, prefix_tokens, vocab_size=config.vocab_size, replies=replies)
        #: request id -> (filler token, output length, last token) of its reply
        self._reply: dict[int, tuple[int, int, int]] = {}
        self.eos_token_ids = set(config.eos_token_ids)
        self._eos = config.eos_token_ids[0]
        self.max_context = config.max_position_embeddings
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.output_tokens = output_tokens
        self.lora_rank = lora_rank if "adapter" in managed else 0
        self.managed = managed
        if kv_cache_tokens is None:
            # An agent-memory budget larger than the device is allowed (a what-if); the pool for
            # running requests then keeps a tenth of the device rather than nothing.
            budget = 0.0 if math.isinf(memory.device_bytes) else memory.device_bytes
            spare = 0.9 * cost.hw.mem_bytes - cost.weight_bytes - budget
            spare = max(spare, 0.1 * cost.hw.mem_bytes)
            if "prefix_kv" in managed:  # cached segments live in the pool, within the budget
                spare += min(budget, 0.9 * cost.hw.mem_bytes)
            kv_cache_tokens = int(min(spare / cost.kv_bytes_per_token, 4_000_000))
        # A sizing-only pool: one float per (block, slot) so the block allocator runs unchanged.
        self.cache = KVCache(1, -(-kv_cache_tokens // block_size), block_size, 1, 1)
        #: the prefix cache over the pool (None: prefix KV is not managed)
        self.prefixes = PrefixTree(self.cache, memory, segment=SizedSegment,
                                   block_nbytes=block_size * cost.kv_bytes_per_token,
                                   scope=prefix_cache, cache_outputs=False) \
            if "prefix_kv" in managed else None
        self._objects: dict[str, ModeledMemory] = {}
        self._stop_hits: dict[tuple[str, ...], bool] = {}
        self.steps = 0
        self.tokens_computed = 0

    @property
    def now(self) -> float:
        """The modeled makespan so far (seconds)."""
        return self.clock.now

    @property
    def architecture(self) -> ModelConfig:
        return self.config

    # -- the executor protocol ----------------------------------------------------------------

    def validate(self, seq: Sequence) -> None:
        needed = self.cache.blocks_for(seq.num_prompt_tokens + seq.request.sampling.max_tokens)
        if needed > self.cache.num_blocks:
            raise RequestError(
                f"request {seq.request_id} of agent {seq.request.agent_id!r}: needs {needed} KV "
                f"blocks, the modeled pool has {self.cache.num_blocks}")

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        """The agent's memory objects this call needs (the admission acquires and releases)."""
        agent = seq.request.agent_id
        out: list[AgentMemory] = []
        if self.lora_rank:
            key = f"adapter:{seq.request.adapter or agent}"
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = ModeledMemory(
                    key, self.cost.lora_bytes(self.lora_rank), "adapter", "host")
            out.append(obj)
        if self.prefixes is not None:
            out += self.prefixes.path(seq)
        return out

    def decode_horizon(self, seq: Sequence) -> int:
        """Tokens left in ``seq``'s placeholder reply, unless a stop string could end it."""
        if seq.request.sampling.stop and self._stop_can_match(seq.request.sampling.stop):
            return 1
        return self._reply_of(seq)[1] - len(seq.output_ids)

    def report(self) -> dict[str, Any]:
        """Modeled totals of the run, labelled with their profiles."""
        t = self.memory.totals
        return {"modeled": {
            "modeled": True, "hardware": self.hardware_name, "model_profile": self.model_name,
            "modeled_makespan_s": self.clock.now, "modeled_compute_s": self.clock.compute,
            "modeled_stall_s": self.clock.stall, "steps": self.steps,
            "tokens_computed": self.tokens_computed, "hits": t.hits, "misses": t.misses,
            "bytes_loaded": t.bytes_loaded, "bytes_prefetched": t.bytes_prefetched,
            "evictions": t.evictions, "link_busy_s": self.link.busy_s}}

    def execute(self, batch: Batch) -> None:
        """Advance the batch by one modeled step, or by ``batch.steps`` decode steps at once.

        A decode run (see :class:`~runtime.scheduler.BatchScheduler`) gives each sequence its
        tokens and advances the clock by the exact sum of the step times and the link timeline
        by as much. The only difference from stepping one by one is that the memory manager's
        tick (installing finished transfers and issuing the next prefetches) runs once at the end.
        """
        lora = self.lora_rank
        steps = batch.steps
        work: list[SeqWork] = []
        for seq in batch:
            start, n = seq.num_computed, seq.chunk
            work.append(SeqWork(n, start, start + n >= seq.num_tokens,
                                seq.request.agent_id if lora else None, lora))
        seconds = (self.cost.decode_seconds(work, steps) if steps > 1
                   else self.cost.step_seconds(work))
        self.clock.now += seconds
        self.clock.compute += seconds
        self.link.advance(self.clock.now)
        self.steps += steps
        for seq, w in zip(batch, work):
            self.tokens_computed += w.new + steps - 1
            seq.num_computed += seq.chunk + steps - 1
            seq.chunk = 0
            if w.sampled:
                filler, limit, end = self._reply_of(seq)
                last = len(seq.output_ids) + steps >= limit
                seq.append_tokens([filler] * (steps - 1) + [end if last else filler])
                if last:
                    del self._reply[seq.request_id]

    # -- helpers ------------------------------------------------------------------------------

    def _reply_of(self, seq: Sequence) -> tuple[int, int, int]:
        """The filler token, output length and last token of ``seq``'s reply (chosen at its first
        token). The last is end-of-sequence unless the reply ends at the request's token limit,
        where the engine stops it (as a recorded "length" finish did)."""
        reply = self._reply.get(seq.request_id)
        if reply is None:
            index, length, eos = self.chat.reply(seq.request)
            max_tokens = seq.request.sampling.max_tokens
            limit = min(max_tokens, self.output_tokens if length is None else length)
            filler = FILLER + index
            end = self._eos if eos or limit < max_tokens else filler
            reply = self._reply[seq.request_id] = (filler, limit, end)
        return reply

    def _stop_can_match(self, stop: Any) -> bool:
        """Whether a stop string occurs in a placeholder reply (else it can never end a call)."""
        key = tuple(stop)
        hit = self._stop_hits.get(key)
        if hit is None:
            hit = self._stop_hits[key] = any(s in r for s in key for r in self.chat.replies)
        return hit
