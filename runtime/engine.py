"""The engine: accepts requests, runs iterations, returns finished completions.

One :meth:`Engine.step` is one iteration: the scheduler picks the batch, the executor advances it,
and the engine decides which sequences are finished (end-of-sequence token, stop string or token
limit). A request that cannot be served fails alone: its :class:`Completion` carries the error and
the other requests go on.
"""

from __future__ import annotations

import itertools
from typing import Any

from runtime.request import Completion, Request, RequestError
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence, SequenceStatus

EXECUTORS = ("hf", "torch", "modeled")


class Engine:
    """Continuous-batching request engine over one executor."""

    def __init__(self, executor: Any, scheduler: Scheduler | None = None) -> None:
        self.executor = executor
        self.scheduler = scheduler or Scheduler(executor.max_num_seqs)
        self._ids = itertools.count()
        self._rejected: list[Sequence] = []
        #: The :class:`runtime.memory.MemoryManager` that keeps agent memory resident, if any.
        self.memory: Any = None
        self._acquired: set[int] = set()

    def attach_memory(self, manager: Any) -> None:
        """Hand residency of the executor's memory objects to ``manager`` (torch executor)."""
        attach = getattr(self.executor, "attach_memory", None)
        if attach is None:
            raise ValueError(f"executor {type(self.executor).__name__} has no memory hooks; "
                             "use runtime.executor: torch")
        attach(manager)
        self.memory = manager
        self._acquired.clear()
        if getattr(self.executor, "prefix_memory", False) and hasattr(self.scheduler, "admit"):
            # Prefix KV is managed too: pin a sequence's objects before it looks up its prefix,
            # and let the manager choose which cached prefixes leave when the KV pool is short.
            block = self.executor.cache.block_nbytes
            self.scheduler.admit = self._admit
            self.scheduler.reclaim = lambda blocks: manager.reclaim(blocks * block,
                                                                    kind="prefix_kv") > 0

    def submit(self, request: Request) -> int:
        """Queue ``request`` and return its request id (assigned here when unset)."""
        if request.request_id < 0:
            request.request_id = next(self._ids)
        try:
            prefix_ids, prompt_ids = self.executor.chat.encode(request.prefix, request.prompt)
        except Exception as exc:  # tokenizers raise on odd input; the request alone fails
            seq = Sequence(request, [], [])
            seq.fail(f"request {request.request_id}: could not tokenize: {exc}")
            self._rejected.append(seq)
            return request.request_id
        seq = Sequence(request, prefix_ids, prompt_ids)
        needed = seq.num_prompt_tokens + request.sampling.max_tokens
        if needed > self.executor.max_context:
            seq.fail(
                f"request {request.request_id} of agent {request.agent_id!r}: "
                f"{seq.num_prompt_tokens} prompt tokens + max_tokens {request.sampling.max_tokens} "
                f"exceed the model context of {self.executor.max_context}"
            )
            self._rejected.append(seq)
            return request.request_id
        prepare = getattr(self.executor, "prepare", None)
        if prepare is not None:
            try:
                prepare(seq)
            except RequestError as exc:
                seq.fail(str(exc))
                self._rejected.append(seq)
                return request.request_id
        if self.memory is not None:  # the manager learns the agent's objects (for prefetch)
            for obj in self.executor.memory_objects(seq):
                self.memory.register(obj, [request.agent_id])
        self.scheduler.add(seq)
        return request.request_id

    def has_work(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_work()

    def step(self) -> list[Completion]:
        """Run one iteration and return the completions that finished in it."""
        finished = [seq.to_completion() for seq in self._rejected]
        self._rejected.clear()
        batch = self.scheduler.schedule()
        if self.memory is not None:
            batch = self._acquire_memory(batch)
        if batch:
            try:
                self.executor.execute(batch)
            except RequestError as exc:
                for seq in batch:
                    seq.fail(str(exc))
            for seq in batch:
                if seq.status is not SequenceStatus.FINISHED and seq.output_ids:
                    self._check_finished(seq)
        done = self.scheduler.remove_finished()
        if self.memory is not None:
            for seq in done:
                if seq.request_id in self._acquired:
                    self._acquired.discard(seq.request_id)
                    self.memory.release(seq.request_id)
        finished += [seq.to_completion() for seq in done]
        if self.memory is not None:
            self.memory.tick()  # between iterations: install finished copies, prefetch
        return finished

    def _acquire_memory(self, batch: list[Sequence]) -> list[Sequence]:
        """Pin the memory objects of newly running sequences, loading what is missing.

        A sequence whose objects cannot be placed now (the device is full of other running
        requests' objects) goes back to the waiting queue; one whose objects can never fit fails.
        """
        kept = []
        for seq in batch:
            if seq.request_id not in self._acquired:
                if not self._admit(seq):
                    if seq.status is not SequenceStatus.FINISHED:
                        self.scheduler.preempt(seq)
                    continue
            kept.append(seq)
        return kept

    def _admit(self, seq: Sequence) -> bool:
        """Pin ``seq``'s memory objects (once); ``False`` if they cannot be placed now or never
        (then ``seq`` has failed)."""
        from runtime.memory import WorkingSetTooLarge

        if seq.request_id in self._acquired:
            return True
        try:
            stats = self.memory.acquire(seq.request_id, self.executor.memory_objects(seq))
        except (WorkingSetTooLarge, RequestError) as exc:
            seq.fail(str(exc))
            return False
        if stats is None:
            return False
        self._acquired.add(seq.request_id)
        # The manager's word on a kind replaces any earlier guess (an executor whose prefix KV
        # lives only in the manager admits after the scheduler has already looked for one).
        for kind in stats.hits:
            seq.memory.misses.pop(kind, None)
        for kind in stats.misses:
            seq.memory.hits.pop(kind, None)
        seq.memory.hits.update(stats.hits)
        seq.memory.misses.update(stats.misses)
        seq.memory.bytes_loaded += stats.bytes_loaded
        seq.memory.stall_s += stats.stall_s
        return True

    def _check_finished(self, seq: Sequence) -> None:
        params = seq.request.sampling
        output = seq.output_ids
        eos_at = next((i for i, t in enumerate(output) if t in self.executor.eos_token_ids), None)
        if eos_at is not None:
            del output[eos_at + 1:]
            seq.text = self.executor.chat.decode(output[:eos_at])
            seq.finish_reason = "stop"
        else:
            # Decoding is the costly part of this check: only when a stop string could match.
            text = self.executor.chat.decode(output) if params.stop else None
            for stop in params.stop:
                cut = text.find(stop)
                if cut >= 0:
                    seq.text = text[:cut]
                    seq.finish_reason = "stop"
                    break
            else:
                if len(output) >= params.max_tokens:
                    seq.text = text if text is not None else self.executor.chat.decode(output)
                    seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.status = SequenceStatus.FINISHED


def build_engine(executor: str = "hf", model: str = "smollm2-135m", device: str = "cpu",
                 dtype: str = "float32", **options: Any) -> Engine:
    """Construct an :class:`Engine` with the named executor."""
    if executor == "hf":
        from runtime.executors.hf import HFExecutor

        return Engine(HFExecutor(model=model, device=device, dtype=dtype, **options))
    if executor == "torch":
        from runtime.executors.torch import TorchExecutor
        from runtime.scheduler import BatchScheduler

        ex = TorchExecutor(model=model, device=device, dtype=dtype, **options)
        return Engine(ex, BatchScheduler(ex.cache, ex.prefixes, ex.max_num_seqs,
                                         ex.max_batch_tokens))
    if executor == "modeled":  # no tensors: device and dtype come from the hardware profile
        from runtime.executors.modeled import build_modeled_engine

        return build_modeled_engine(model=model, **options)
    raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
