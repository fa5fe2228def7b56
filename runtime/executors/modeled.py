"""The modeled executor: the real scheduler and memory manager, with time from a cost model.

:class:`ModeledExecutor` allocates no tensors. Tokenization only counts (about four characters per
token), a step appends placeholder tokens and advances a virtual clock by the
:class:`~runtime.cost_model.CostModel`'s step time, and the agents' memory objects (a LoRA adapter
and the persona-prefix KV per agent) are sizes that the
:class:`~runtime.memory.MemoryManager` moves between tiers with its real policies. Copies go
through :class:`ModeledCopyEngine`, a link timeline in the same virtual clock: transfers proceed
while steps compute, as on a copy stream, and a request whose object is still on the link waits
(a *stall*). An urgent load preempts a running prefetch unless ``preempt_prefetch=False``.

Memory goes through the engine like the torch executor's: :meth:`ModeledExecutor.memory_objects`
names a sequence's objects, and the :class:`~runtime.engine.Engine` acquires them before the step,
releases them when the request finishes and ticks the manager between steps.
:meth:`ModeledExecutor.attach_memory` adapts any :class:`~runtime.memory.MemoryManager` (its own
by default, or one built from ``runtime.memory``) to modeled time: the virtual link replaces the
copy thread and stalls are read off the virtual clock.

The *modeled makespan* (:attr:`ModeledExecutor.now`) is the modeled serving time of the whole run:
the sum of step times plus the stalls that compute did not hide. LLM calls still take zero
simulated time in the world; the two clocks are separate on purpose.

Prompts are sized by :class:`LengthChat` (characters per token) and answered with placeholder
replies, or, to check the model against a real run, by :class:`ReplayChat`, which tokenizes
with the real chat template and answers every call as the recorded run did.

The prefix KV of an agent is computed (prefilled) the first time and whenever no copy of it is left
(policy ``none``, or no host tier: ``host_bytes=0``, the default); with a host tier an evicted
prefix moves there, a miss loads it over the link and the step skips those tokens. Adapters always have a host copy. The KV blocks of the running sequences are
accounted by the scheduler's :class:`~runtime.kv_cache.KVCache` (a sizing-only pool); a resident
prefix object and the blocks of a sequence that reuses it are counted separately (a small
overestimate of KV use).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import torch

from runtime.cost_model import CostModel, SeqWork, hardware
from runtime.kv_cache import KVCache
from runtime.memory import AgentMemory, MemoryManager, Policy, Transfer, make_policy
from runtime.model.profiles import profile
from runtime.prefix_cache import PrefixCache
from runtime.request import RequestError
from runtime.sequence import Sequence, SequenceStatus



#: Output token ids start here: above every vocabulary, so a filler is never an end-of-sequence id.
FILLER = 1 << 24


class LengthChat:
    """Tokenization by length only: ``ceil(chars / chars_per_token)`` placeholder ids per turn.

    The ids of a text are all one value derived from the text, so equal texts give equal ids (a
    stable prefix stays a token-prefix) at the cost of a list multiplication. ``prefix_tokens``
    fixes the prefix length instead (to model long personas). ``template_tokens`` stands for the
    chat template's role markers. Output is placeholder text: the executor emits filler token
    ``FILLER + i`` for a call and :meth:`decode` turns it into ``replies[i]``, so a world can be fed a
    deterministic mix of answers (``("post", "reply", "nothing")``) to keep its branches busy.
    """

    def __init__(self, chars_per_token: float = 4.0, prefix_tokens: int | None = None,
                 template_tokens: int = 5, vocab_size: int = 32000,
                 replies: tuple[str, ...] = ("ok",)) -> None:
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be > 0, got {chars_per_token}")
        self.chars_per_token = chars_per_token
        self.prefix_tokens = prefix_tokens
        self.template_tokens = template_tokens
        self.vocab_size = vocab_size
        if not replies:
            raise ValueError("replies must name at least one placeholder answer")
        self.replies = tuple(replies)

    def _ids(self, text: str, n: int) -> list[int]:
        return [2 + hash(text) % (self.vocab_size - 2)] * n

    def count(self, text: str) -> int:
        return self.template_tokens + math.ceil(len(text) / self.chars_per_token)

    def encode(self, prefix: str, prompt: str) -> tuple[list[int], list[int]]:
        prompt_ids = self._ids(prompt, self.count(prompt))
        if not prefix:
            return [], prompt_ids
        n = self.prefix_tokens if self.prefix_tokens is not None else self.count(prefix)
        return self._ids(prefix, n), prompt_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.replies[(token_ids[0] - FILLER) % len(self.replies)] if token_ids else ""

    def reply(self, request_id: int, agent: str) -> tuple[int, int | None, bool]:
        """Which placeholder answers a call, its length (``None``: the executor's default) and
        whether its last token is end-of-sequence."""
        return request_id % len(self.replies), None, True


class ReplayChat:
    """A finished run's replies, replayed: the modeled engine serves the same calls as the run did.

    Prompts are tokenized with the real model's chat template (``chat``, a
    :class:`~runtime.model.chat.ChatFormat`), so prompt and prefix lengths are the real ones. The
    ``k``-th call of an agent is answered with the ``k``-th completion that agent got in the
    recorded ``trace`` (a :func:`scalesim.load_trace` frame: ``request_id``, ``agent``,
    ``completion``, ``output_tokens``, ``finish_reason``), generating as many tokens and ending
    the same way (end-of-sequence, or the token limit). A world whose choices depend
    only on its replies and its seed then makes the same calls in the same order, so the modeled
    makespan of the replay can be set against the measured one of the recording
    (``experiments/validate_modeled.py``).
    """

    def __init__(self, chat: Any, trace: Any) -> None:
        self.chat = chat
        rows = trace.sort_values("request_id")
        self.replies = tuple(str(t) if isinstance(t, str) else "" for t in rows["completion"])
        self._next: dict[str, list[tuple[int, int, bool]]] = {}
        for i, (agent, n, finish) in enumerate(zip(rows["agent"], rows["output_tokens"],
                                                   rows["finish_reason"])):
            self._next.setdefault(agent, []).append((i, max(1, int(n)), finish != "length"))
        for queue in self._next.values():
            queue.reverse()  # pop() from the end gives the agent's calls in order

    def encode(self, prefix: str, prompt: str) -> tuple[list[int], list[int]]:
        return self.chat.encode(prefix, prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.replies[token_ids[0] - FILLER] if token_ids else ""

    def reply(self, request_id: int, agent: str) -> tuple[int, int | None, bool]:
        queue = self._next.get(agent)
        if not queue:
            raise RequestError(f"request {request_id}: agent {agent!r} makes more calls than it "
                               "made in the recorded run (the world did not replay identically)")
        return queue.pop()


class ModeledMemory(AgentMemory):
    """A memory object that is only a size: loads cost link time, a rebuild costs a prefill.

    ``origin="host"`` objects (adapters) always have a host copy; ``origin="recompute"`` objects
    (prefix KV) must be computed by the model the first time (``threadsafe = False`` makes the
    manager do that inline; :attr:`recomputes` counts it so the executor charges the prefill).
    Once computed, an evicted prefix KV goes to the host tier when the manager has room there
    (``host_bytes``), and a later miss copies it back instead of recomputing it.
    """

    def __init__(self, key: str, nbytes: int, kind: str, origin: str) -> None:
        super().__init__(key, nbytes)
        self.kind = kind  # type: ignore[misc]
        self.origin = origin  # type: ignore[misc]
        self.threadsafe = origin != "recompute"  # type: ignore[misc]
        self.recomputes = 0
        self.fresh = False

    def materialize(self) -> dict:
        if self.origin == "recompute":
            self.recomputes += 1
            self.fresh = True  # the next step that uses it computes it (a prefill)
        return {}

    def device_tensors(self) -> dict:
        # A zero-size tensor stands for the computed KV: the manager counts nbytes, not its size.
        if self.origin == "recompute" and not self.fresh:
            return {"kv": torch.empty(0)}
        return {}


class _VirtualDone:
    """Stands in for a transfer's ``threading.Event``: waiting advances the virtual clock."""

    def __init__(self, engine: "ModeledCopyEngine", transfer: Transfer) -> None:
        self.engine, self.transfer, self.flag = engine, transfer, False

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float | None = None) -> bool:
        if not self.flag:
            self.engine.wait_for(self.transfer)
        return True


@dataclass
class VirtualClock:
    """Modeled seconds since the start; :attr:`stall` is the part spent waiting on the link."""

    now: float = 0.0
    stall: float = 0.0
    compute: float = 0.0


class ModeledCopyEngine:
    """One host-to-device link in virtual time, with the :class:`~runtime.memory.CopyEngine` API.

    Jobs run one at a time in priority order (urgent first, then nearest distance, then arrival).
    :meth:`advance` moves the link up to the clock; :meth:`wait_for` moves the clock (a stall)
    until a job is done.
    """

    def __init__(self, clock: VirtualClock, cost: CostModel, *, preempt: bool = True) -> None:
        self.clock, self.cost, self.preempt = clock, cost, preempt
        self._queue: list[tuple[bool, float, int, Transfer]] = []
        self._order = 0
        self.current: Transfer | None = None
        self._end = 0.0          # when the current job finishes
        self._free_at = 0.0      # when the link became (or becomes) idle
        self.busy_s = 0.0
        self.aborted_bytes = 0

    def submit(self, transfer: Transfer) -> Transfer:
        self.advance(self.clock.now)
        transfer.done = _VirtualDone(self, transfer)  # type: ignore[assignment]
        self._order += 1
        transfer.order = self._order
        heapq.heappush(self._queue, (not transfer.urgent, transfer.distance, self._order, transfer))
        if transfer.urgent:
            self._preempt_current()
        self._start_next()
        return transfer

    def promote(self, transfer: Transfer) -> None:
        if transfer.urgent or transfer.done.is_set():
            return
        self.advance(self.clock.now)
        transfer.urgent = True
        if transfer is self.current:
            return
        self._queue = [e for e in self._queue if e[3] is not transfer]
        heapq.heapify(self._queue)
        heapq.heappush(self._queue, (False, 0.0, transfer.order, transfer))
        self._preempt_current()
        self._start_next()

    def cancel(self, transfer: Transfer) -> None:
        if transfer.done.is_set():
            return
        if transfer is self.current:
            self._abort_current()
        else:
            self._queue = [e for e in self._queue if e[3] is not transfer]
            heapq.heapify(self._queue)
            transfer.aborted = True
            transfer.done.set()
        self._start_next()

    def close(self) -> None:
        pass

    # -- the timeline -------------------------------------------------------------------------

    def _preempt_current(self) -> None:
        if self.preempt and self.current is not None and not self.current.urgent:
            self._abort_current()

    def _abort_current(self) -> None:
        job, self.current = self.current, None
        done_s = self.clock.now - job.started_at  # type: ignore[attr-defined]
        self.busy_s += done_s
        self.aborted_bytes += job.obj.nbytes
        self._free_at = self.clock.now
        job.aborted = True
        job.done.set()

    def _start_next(self) -> None:
        if self.current is None and self._queue:
            job = heapq.heappop(self._queue)[3]
            start = max(self._free_at, self.clock.now)
            job.started = True
            job.started_at = start  # type: ignore[attr-defined]
            job.seconds = self.cost.copy_seconds(job.obj.nbytes)
            self.current, self._end = job, start + job.seconds

    def advance(self, until: float) -> None:
        """Finish every job that the link completes by ``until``."""
        while self.current is not None and self._end <= until:
            job, self.current = self.current, None
            self.busy_s += job.seconds
            self._free_at = self._end
            job.result = {}
            job.done.set()
            if self._queue:
                job = heapq.heappop(self._queue)[3]
                job.started = True
                job.started_at = self._free_at  # type: ignore[attr-defined]
                job.seconds = self.cost.copy_seconds(job.obj.nbytes)
                self.current, self._end = job, self._free_at + job.seconds

    def wait_for(self, transfer: Transfer) -> None:
        """Stall the clock until ``transfer`` is done (it must be queued or running)."""
        while not transfer.done.is_set():
            if self.current is None:
                self._start_next()
                if self.current is None:
                    raise RuntimeError(f"waiting on {transfer!r}, which is not on the link")
            if self._end > self.clock.now:
                self.clock.stall += self._end - self.clock.now
                self.clock.now = self._end
            self.advance(self.clock.now)

    def next_completion(self) -> float | None:
        return self._end if self.current is not None else None


class ModeledExecutor:
    """An executor with no tensors: see the module docstring.

    ``hardware`` and ``model`` name a :data:`~runtime.cost_model.HARDWARE` row and a model
    profile. ``memory_bytes`` is the device budget for agent memory (``None``: unlimited),
    ``policy`` the memory policy (a name or a :class:`~runtime.memory.Policy`), ``lora_rank`` the
    rank of each agent's own adapter (0: no adapters), ``managed`` which kinds of agent memory
    exist (``adapter``, ``prefix_kv``), ``output_tokens`` how many tokens each call generates (at
    most its ``max_tokens``). ``kv_cache_tokens=None`` sizes the KV pool from the device memory
    left after weights and the agent-memory budget. ``host_bytes`` is the host tier for evicted
    prefix KV (0, the default: none, a miss re-prefills; ``None``: unlimited). ``chat`` replaces
    the placeholder replies with a :class:`ReplayChat`.
    """

    def __init__(self, model: str = "qwen2.5-7b", hardware_profile: str = "H100", *,
                 policy: str | Policy = "lru", memory_bytes: int | None = None,
                 lora_rank: int = 0, managed: tuple[str, ...] = ("adapter", "prefix_kv"),
                 prefix_tokens: int | None = None, output_tokens: int = 32,
                 chars_per_token: float = 4.0, max_num_seqs: int = 256,
                 max_batch_tokens: int = 8192, block_size: int = 16,
                 kv_cache_tokens: int | None = None, lookahead: int = 32,
                 preempt_prefetch: bool = True, replies: tuple[str, ...] = ("ok",),
                 chat: ReplayChat | None = None, host_bytes: int | None = 0,
                 cost: CostModel | None = None,
                 **hardware_overrides: float) -> None:
        for kind in managed:
            if kind not in ("adapter", "prefix_kv"):
                raise ValueError(f"managed memory kind {kind!r}: choose adapter, prefix_kv")
        if output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
        self.config = profile(model)
        self.cost = cost or CostModel(hardware(hardware_profile, **hardware_overrides), self.config)
        self.model_name, self.hardware_name = model, self.cost.hw.name
        self.chat: LengthChat | ReplayChat = chat or LengthChat(
            chars_per_token, prefix_tokens, vocab_size=self.config.vocab_size, replies=replies)
        #: request id -> (filler token, output length, last token) of its reply
        self._reply: dict[int, tuple[int, int, int]] = {}
        self.eos_token_ids = set(self.config.eos_token_ids)
        self._eos = self.config.eos_token_ids[0]
        self.max_context = self.config.max_position_embeddings
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.output_tokens = output_tokens
        self.lora_rank = lora_rank if "adapter" in managed else 0
        self.managed = managed
        if kv_cache_tokens is None:
            # An agent-memory budget larger than the device is allowed (a what-if); the pool for
            # running requests then keeps a tenth of the device rather than nothing.
            spare = 0.9 * self.cost.hw.mem_bytes - self.cost.weight_bytes - (memory_bytes or 0)
            spare = max(spare, 0.1 * self.cost.hw.mem_bytes)
            kv_cache_tokens = int(min(spare / self.cost.kv_bytes_per_token, 4_000_000))
        # A sizing-only pool: one float per (block, slot) so the block allocator runs unchanged.
        self.cache = KVCache(1, -(-kv_cache_tokens // block_size), block_size, 1, 1)
        self.prefixes = PrefixCache(self.cache)  # stays empty: prefix KV is a managed object
        self.clock = VirtualClock()
        self.preempt_prefetch = preempt_prefetch
        self.attach_memory(MemoryManager(
            policy if isinstance(policy, Policy) else make_policy(policy),
            device_bytes=memory_bytes, host_bytes=host_bytes, lookahead=lookahead))
        #: tokens of each running request's prefix that a resident prefix KV saves computing
        self._prefix_cached: dict[int, int] = {}
        #: the engine's scheduler, when built by build_modeled_engine (multi-step decodes)
        self.scheduler: Any = None
        self._stop_hits: dict[tuple[str, ...], bool] = {}
        self.steps = 0
        self.tokens_computed = 0

    def attach_memory(self, manager: MemoryManager) -> None:
        """Run ``manager`` in modeled time: copies on the virtual link, stalls on the clock."""
        manager.copy.close()  # the copy thread is replaced by the virtual link
        manager.copy = ModeledCopyEngine(self.clock, self.cost,  # type: ignore[assignment]
                                         preempt=self.preempt_prefetch)
        manager.clock = lambda: self.clock.now
        self.memory = manager

    # -- time ---------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The modeled makespan so far (seconds)."""
        return self.clock.now

    def summary(self) -> dict[str, Any]:
        """Modeled totals of the run, labelled with their profiles."""
        t = self.memory.totals
        return {"modeled": True, "hardware": self.hardware_name, "model_profile": self.model_name,
                "modeled_makespan_s": self.clock.now, "modeled_compute_s": self.clock.compute,
                "modeled_stall_s": self.clock.stall, "steps": self.steps,
                "tokens_computed": self.tokens_computed,
                "hits": int(t.get("hits", 0)), "misses": int(t.get("misses", 0)),
                "bytes_loaded": int(t.get("bytes_loaded", 0)),
                "bytes_prefetched": int(t.get("bytes_prefetch", 0)),
                "evictions": int(t.get("evictions", 0)),
                "link_busy_s": self.memory.copy.busy_s}

    # -- the executor protocol ----------------------------------------------------------------

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        """The agent's memory objects this call needs (the engine acquires and releases them)."""
        agent = seq.request.agent_id
        memory = self.memory
        out: list[AgentMemory] = []
        if self.lora_rank:
            key = f"adapter:{seq.request.adapter or agent}"
            obj = memory.objects.get(key)
            if obj is None:
                obj = memory.register(ModeledMemory(
                    key, self.cost.lora_bytes(self.lora_rank), "adapter", "host"), (agent,))
            elif agent not in obj.users:
                memory.register(obj, (agent,))
            out.append(obj)
        if seq.prefix_ids and "prefix_kv" in self.managed:
            key = f"prefix_kv:{agent}"
            obj = memory.objects.get(key)
            nbytes = len(seq.prefix_ids) * self.cost.kv_bytes_per_token
            if obj is None or obj.nbytes != nbytes:
                if obj is not None and (obj.pins or obj.device is not None
                                        or key in memory.inflight):
                    raise RequestError(f"request {seq.request_id} of agent {agent!r}: its prefix "
                                       "changed length while the old one is still in use")
                memory.objects.pop(key, None)
                obj = memory.register(ModeledMemory(key, nbytes, "prefix_kv", "recompute"),
                                      (agent,))
            out.append(obj)
        return out

    def prepare(self, seq: Sequence) -> None:
        needed = self.cache.blocks_for(seq.num_prompt_tokens + seq.request.sampling.max_tokens)
        if needed > self.cache.num_blocks:
            raise RequestError(
                f"request {seq.request_id} of agent {seq.request.agent_id!r}: needs {needed} KV "
                f"blocks, the modeled pool has {self.cache.num_blocks}")

    def _prefix_skip(self, seq: Sequence) -> int:
        """Prefix tokens the step need not compute: all of them unless the KV was just rebuilt."""
        cached = self._prefix_cached.get(seq.request_id)
        if cached is None:
            cached = 0
            if seq.prefix_ids and "prefix_kv" in self.managed:
                obj = self.memory.objects.get(f"prefix_kv:{seq.request.agent_id}")
                if obj is not None and obj.fresh:
                    obj.fresh = False  # this step computes it
                else:
                    cached = len(seq.prefix_ids)
                    seq.cached_tokens = cached
            self._prefix_cached[seq.request_id] = cached
        return cached

    def execute(self, batch: list[Sequence]) -> None:
        """Advance the batch by one modeled step, or by several when only decodes would run.

        When every running sequence of the batch is decoding, nothing waits and no stop string
        is set, the next iterations would run this same batch until its first sequence finishes
        (no world event can intervene: the world is idle while calls are in flight). Those
        steps are then taken at once: each sequence gets its tokens, blocks and KV growth, the
        clock advances by the exact sum of the step times and the link timeline by as much. The
        only difference from stepping one by one is that the memory manager's tick (installing
        finished transfers and issuing the next prefetches) runs once at the end.
        """
        lora = self.lora_rank
        work: list[SeqWork] = []
        for seq in batch:
            start, n = seq.num_computed, seq.chunk
            skip = min(max(self._prefix_skip(seq) - start, 0), n)
            work.append(SeqWork(n - skip, start + skip, start + n >= seq.num_tokens,
                                seq.request.agent_id if lora else None, lora))
        steps = self._decode_run(batch)
        seconds = (self.cost.decode_seconds(work, steps) if steps > 1
                   else self.cost.step_seconds(work))
        self.clock.now += seconds
        self.clock.compute += seconds
        self.memory.copy.advance(self.clock.now)
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
                    self._prefix_cached.pop(seq.request_id, None)
                    del self._reply[seq.request_id]

    def _reply_of(self, seq: Sequence) -> tuple[int, int, int]:
        """The filler token, output length and last token of ``seq``'s reply (chosen at its first
        token). The last is end-of-sequence unless the reply ends at the request's token limit,
        where the engine stops it (as a recorded "length" finish did)."""
        reply = self._reply.get(seq.request_id)
        if reply is None:
            index, length, eos = self.chat.reply(seq.request_id, seq.request.agent_id)
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

    def _decode_run(self, batch: list[Sequence]) -> int:
        """How many decode steps ``batch`` can take at once (1: step normally)."""
        sched = self.scheduler
        if (sched is None or len(batch) != len(sched.running)
                or (sched.waiting and len(sched.running) < sched.max_num_seqs)):
            return 1  # someone else would join the next step
        steps = math.inf
        for seq in batch:
            if seq.chunk != 1 or seq.num_computed + 1 != seq.num_tokens:
                return 1
            if seq.request.sampling.stop and self._stop_can_match(seq.request.sampling.stop):
                return 1
            steps = min(steps, self._reply_of(seq)[1] - len(seq.output_ids))
        if not batch or steps <= 1:
            return 1
        cache = self.cache
        need = [cache.blocks_for(seq.num_tokens + steps - 1) - len(seq.block_table)
                for seq in batch]
        if sum(need) > cache.num_free:
            return 1  # the pool would run short in between: step one by one (and preempt)
        for seq, n in zip(batch, need):
            if n > 0:
                seq.block_table += cache.allocate(n)
        return int(steps)


def build_modeled_engine(**options: Any) -> Any:
    """An :class:`~runtime.engine.Engine` over a :class:`ModeledExecutor` and the batch scheduler."""
    from runtime.engine import Engine
    from runtime.scheduler import BatchScheduler

    ex = ModeledExecutor(**options)
    engine = Engine(ex, BatchScheduler(ex.cache, ex.prefixes, ex.max_num_seqs,
                                       ex.max_batch_tokens))
    engine.attach_memory(ex.memory)
    ex.scheduler = engine.scheduler  # to see when only decodes are left (see execute)
    return engine
