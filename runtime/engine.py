"""The engine: accepts requests, runs iterations, returns finished completions.

One :meth:`Engine.step` is one iteration: the scheduler picks the batch (admitting waiting
requests through the memory admission), the executor advances it, and the engine decides which
sequences are finished (end-of-sequence token, stop string or token limit). A request that cannot
be served fails alone: its :class:`Completion` carries the error and the other requests go on.
That holds for faults found while it runs too: when the executor raises over a batch before it
changed any sequence (one sequence's preparation failed), the engine runs the two halves of the
batch again, and so on down to the one sequence at fault, which alone fails (bisection: about
``2 log2(batch)`` extra passes, in an iteration that failed, never in one that did not). A
:class:`RequestError` is the request's fault; any other exception is the engine's, and the
completion says so (``internal_error``). The engine itself is never left failed by a request.

:class:`Engine` implements :class:`runtime.interface.EngineInterface`, the one interface every
front end drives; nothing outside this package reaches its executor, scheduler or admission.
:func:`build_engine` is the one place an engine is assembled, in the order data flows::

    MemoryManager -> executor -> MemoryAdmission -> scheduler -> Engine

Every executor (``torch``, ``hf``, ``modeled``) gets the same manager and admission; the modeled
one puts the manager on a virtual link and clock instead of a copy thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from runtime.admission import MemoryAdmission
from runtime.executors.base import Executor
from runtime.interface import EngineClock, EngineListener, StepResult, StepTimed
from runtime.memory import DistanceSource, MemoryManager, Policy
from runtime.model.profiles import ModelConfig
from runtime.request import Completion, Request, RequestError, Turn
from runtime.scheduler import Scheduler
from runtime.sequence import Batch, Sequence, SequenceStatus

if TYPE_CHECKING:  # torch is imported only where embeddings are made
    from runtime.embedding import EmbeddingPass

EXECUTORS = ("hf", "torch", "modeled")

log = logging.getLogger("runtime.engine")


class Engine:
    """Continuous-batching request engine over one executor (see the module docstring)."""

    def __init__(self, executor: Executor, scheduler: Scheduler,
                 admission: MemoryAdmission) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.admission = admission
        #: the memory manager of the engine's agent memory (tests and runtime internals)
        self.memory: MemoryManager = admission.manager
        self._ids = itertools.count()
        self._rejected: list[Sequence] = []
        self._step_listeners: list[EngineListener] = []

    # -- what the engine is --------------------------------------------------------------------

    @property
    def clock(self) -> EngineClock:
        return self.executor.engine_clock

    @property
    def max_context(self) -> int:
        return self.executor.max_context

    @property
    def structured_output(self) -> bool:
        return bool(getattr(self.executor, "structured_output", False))

    @property
    def embeddings(self) -> bool:
        return hasattr(self.executor, "embedding_pass")

    @property
    def policy_name(self) -> str:
        return self.memory.policy.name

    @property
    def uses_distance(self) -> bool:
        return self.memory.policy.uses_distance

    def prompt_tokens(self, prefix: str, prompt: str, history: abc.Sequence[Turn] = ()) -> int:
        prefix_ids, prompt_ids = self.encode(prefix, prompt, history)
        return len(prefix_ids) + len(prompt_ids)

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)`` of a request, as :meth:`submit` would tokenize it; safe
        on any thread (the chat codecs keep only caches, and the tokenizer is not mutated)."""
        return self.executor.chat.encode(prefix, prompt, history)

    def architecture(self) -> ModelConfig | None:
        return self.executor.architecture

    def embedding(self, input: str | list[int]) -> EmbeddingPass:
        """The pooled embedding of ``input`` as a pass to step between iterations
        (:mod:`runtime.embedding`); a :class:`RequestError` where the executor computes no
        hidden states (``modeled``, ``hf``)."""
        make = getattr(self.executor, "embedding_pass", None)
        if make is None:
            raise RequestError(f"embeddings need the torch executor: "
                               f"{type(self.executor).__name__} computes no hidden states")
        made: EmbeddingPass = make(input)
        return made

    # -- what goes in --------------------------------------------------------------------------

    def use_distance(self, source: DistanceSource,
                     clock: Callable[[], float] | None = None) -> None:
        """Read invocation distances from ``source`` (one engine needs no ``clock``)."""
        self.memory.use_distance(source)

    def place(self, agent_id: str, replica: int) -> None:
        """One engine has no replicas: every agent's home is here."""

    def listen(self, listener: EngineListener) -> None:
        """Call ``listener`` with every memory event and every timed step from now on."""
        self.memory.listeners.append(listener)
        self._step_listeners.append(listener)

    def submit(self, request: Request) -> int:
        """Queue ``request`` and return its request id (assigned here when unset)."""
        if request.request_id < 0:
            request.request_id = next(self._ids)
        if request.encoded is not None:  # tokenized by the caller, off this thread
            prefix_ids, prompt_ids = (list(ids) for ids in request.encoded)
        else:
            try:
                prefix_ids, prompt_ids = self.executor.chat.encode(request.prefix, request.prompt,
                                                                   request.history)
            except Exception as exc:  # tokenizers raise on odd input; the request alone fails
                return self._reject(Sequence(request, [], []),
                                    f"request {request.request_id}: could not tokenize: {exc}")
        seq = Sequence(request, prefix_ids, prompt_ids)
        needed = seq.num_prompt_tokens + request.sampling.max_tokens
        if needed > self.executor.max_context:
            return self._reject(seq, (
                f"request {request.request_id} of agent {request.agent_id!r}: "
                f"{seq.num_prompt_tokens} prompt tokens + max_tokens {request.sampling.max_tokens} "
                f"exceed the model context of {self.executor.max_context}"))
        constraint = request.constraint
        if constraint is not None and constraint.required and not self.structured_output:
            return self._reject(seq, (
                f"request {request.request_id}: a constrained reply ({constraint.kind}) needs an "
                f"executor that samples real tokens with a tokenizer (torch or hf); "
                f"{type(self.executor).__name__} has none"))
        try:
            self.executor.validate(seq)
            self.admission.register(seq)  # the manager learns the agent's objects (prefetch)
        except RequestError as exc:
            return self._reject(seq, str(exc))
        except Exception as exc:  # an executor's bug on this request: it alone fails
            log.exception("request %s failed at submission", request.request_id)
            return self._reject(seq, _internal(exc), internal=True)
        self.scheduler.add(seq)
        return request.request_id

    def _reject(self, seq: Sequence, error: str, internal: bool = False) -> int:
        seq.fail(error, internal)
        self._rejected.append(seq)
        return seq.request_id

    def has_work(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_work()

    def declare(self, agent_id: str, prefix: str, adapter: str | None = None) -> None:
        """Make an agent's memory objects (its adapter, its persona's prefix KV) known before
        its first call, so the manager can prefetch them for it (and the ``infinite`` bound has
        them from the start). Nothing is computed; an unusable persona or adapter is left to
        fail the agent's first real request, with its error there.
        """
        request = Request(agent_id, "", prefix=prefix, adapter=adapter)
        try:
            prefix_ids, prompt_ids = self.executor.chat.encode(prefix, "")
        except Exception:  # a tokenizer's own error type; the real request reports it
            return
        try:
            self.admission.register(Sequence(request, prefix_ids, prompt_ids))
        except RequestError:
            return

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """Fail a queued or running request between iterations (its client went away).

        Its completion (``finish_reason`` ``"error"``) comes out of the next :meth:`step`, which
        also releases its memory objects and KV blocks. ``False`` if no such request is queued
        or running (it finished already, or was never submitted).
        """
        return self.scheduler.cancel(request_id, reason)

    def step(self) -> StepResult:
        """Run one iteration and return what finished in it."""
        finished = [seq.to_completion() for seq in self._rejected]
        self._rejected.clear()
        batch = self.scheduler.schedule()
        steps, tokens = (batch.steps, sum(s.chunk for s in batch) * batch.steps) if batch \
            else (0, 0)
        modeled_before = self.clock.now() if self.clock.modeled else None
        if batch:
            self._execute(batch, tokens)
            for seq in batch:
                if seq.status is not SequenceStatus.FINISHED and seq.output_ids:
                    try:
                        self._check_finished(seq)
                    except Exception as exc:  # a decoder that chokes on these tokens
                        log.exception("request %s failed in its stop check", seq.request_id)
                        seq.fail(_internal(exc), internal=True)
        done = self.scheduler.remove_finished()
        for seq in done:
            self.admission.release(seq)
        finished += [seq.to_completion() for seq in done]
        self.admission.tick()  # between iterations: install finished copies, prefetch
        running = self.scheduler.running
        return StepResult(
            finished, {s.request_id: self._partial(s) for s in running
                       if s.request.stream and s.output_ids},
            batch=len(running) + len(done), steps=steps, tokens=tokens,
            waiting=len(self.scheduler.waiting), running=len(running),
            modeled_s=None if modeled_before is None else self.clock.now() - modeled_before)

    def _execute(self, batch: Batch, tokens: int) -> None:
        """The executor's forward pass over ``batch`` (``tokens`` to compute), timed for the
        listeners."""
        if self._step_listeners:
            sequences = len(batch)
            prefill = sum(s.chunk for s in batch if s.num_computed < s.num_prompt_tokens)
            modeled = self.clock.now() if self.clock.modeled else None
            start = time.perf_counter()
        self._execute_isolated(batch.seqs, batch.steps)
        if self._step_listeners:
            event = StepTimed(0, sequences, tokens, prefill, time.perf_counter() - start,
                              None if modeled is None else self.clock.now() - modeled)
            for listener in self._step_listeners:
                listener(event)

    def _execute_isolated(self, seqs: list[Sequence], steps: int) -> None:
        """The executor's pass over ``seqs``, so that a fault fails only the sequences at fault
        (see the module docstring)."""
        before = [(s.num_computed, s.chunk, len(s.output_ids)) for s in seqs]
        try:
            self.executor.execute(Batch(seqs, steps))
            return
        except Exception as exc:
            error = exc
        # Run the halves again only if the executor changed nothing: a sequence whose chunk
        # was computed (or a token sampled) must not compute it twice.
        if len(seqs) > 1 and before == [(s.num_computed, s.chunk, len(s.output_ids))
                                        for s in seqs]:
            half = len(seqs) // 2
            self._execute_isolated(seqs[:half], steps)
            self._execute_isolated(seqs[half:], steps)
            return
        internal = not isinstance(error, RequestError)
        if internal:
            log.error("the executor failed on request(s) %s", [s.request_id for s in seqs],
                      exc_info=error)
        for seq in seqs:
            if seq.status is not SequenceStatus.FINISHED:
                seq.fail(_internal(error) if internal else str(error), internal)

    def _partial(self, seq: Sequence) -> str:
        """A streaming sequence's text so far (empty where its tokens do not decode)."""
        try:
            return self.executor.chat.decode(seq.output_ids)
        except Exception:  # its stop check fails it at the next iteration, with the error
            return ""

    def tick(self) -> None:
        """While idle: the manager installs finished copies and prefetches."""
        self.admission.tick()

    def report(self) -> dict[str, Any]:
        """The executor's sections and the memory totals, for ``summary.json``."""
        return {**self.executor.report(), "memory": self.memory.summary()}

    def close(self) -> None:
        """Stop the memory manager's copy engine."""
        self.admission.close()

    def _check_finished(self, seq: Sequence) -> None:
        params = seq.request.sampling
        output = seq.output_ids
        eos = () if params.ignore_eos else self.executor.eos_token_ids
        eos_at = next((i for i, t in enumerate(output) if t in eos), None)
        if eos_at is not None:
            del output[eos_at + 1:]
            seq.text = self.executor.chat.decode(output[:eos_at])
            seq.finish_reason = "stop"
        else:
            # Decoding is the costly part of this check: only when a stop string could match.
            text = self.executor.chat.decode(output) if params.stop else None
            for stop in params.stop:
                assert text is not None
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


def _internal(exc: BaseException) -> str:
    """The error of a request the engine failed on by its own fault."""
    return f"internal error while serving this request: {type(exc).__name__}: {exc}"


def build_engine(executor: str | Executor = "hf", model: str = "smollm2-135m", device: str = "cpu",
                 dtype: str = "float32", *, policy: str | Policy = "lru",
                 device_bytes: int | None = None, host_bytes: int | None = None,
                 disk_dir: str | Path | None = None, kv_store: str | Path | None = None,
                 kv_store_bytes: int | None = None, link_gbps: float | None = None,
                 link_latency_us: float = 0.0, lookahead: int = 16,
                 distance: DistanceSource | None = None, **options: Any) -> Engine:
    """Assemble an :class:`Engine` with the named executor and its memory manager.

    The memory keywords configure the :class:`~runtime.memory.MemoryManager` (``policy``,
    ``device_bytes`` budget, ``host_bytes``, ``disk_dir``, the persistent ``kv_store`` and its
    cap ``kv_store_bytes``, the emulated link, ``lookahead``,
    the ``distance`` source); the defaults keep every object resident (no limit, LRU).
    ``options`` go to the executor (:class:`~runtime.executors.torch.TorchExecutor`'s pool
    sizes) or, ``shared_prefill``, to the :class:`~runtime.scheduler.BatchScheduler`; for
    ``modeled``, ``hardware_profile``, ``preempt_prefetch``, ``cost`` and the
    :class:`~runtime.executors.modeled.ModeledExecutor` keywords). ``executor`` may also be an
    :class:`~runtime.executors.base.Executor` object of one's own, served one request per
    call by the first-come first-served :class:`~runtime.scheduler.Scheduler`.
    """
    memory = dict(policy=policy, device_bytes=device_bytes, host_bytes=host_bytes,
                  disk_dir=disk_dir, kv_store=kv_store, kv_store_bytes=kv_store_bytes,
                  lookahead=lookahead, distance=distance)
    if not isinstance(executor, str):
        manager = MemoryManager(**memory)  # type: ignore[arg-type]
        admission = MemoryAdmission(manager, executor.memory_objects)
        return Engine(executor, Scheduler(executor.max_num_seqs, admission), admission)
    if executor == "hf":
        from runtime.executors.hf import HFExecutor

        manager = MemoryManager(**memory)  # type: ignore[arg-type]
        hf = HFExecutor(model=model, device=device, dtype=dtype, **options)
        admission = MemoryAdmission(manager, hf.memory_objects)
        return Engine(hf, Scheduler(hf.max_num_seqs, admission), admission)
    if executor == "torch":
        from runtime.executors.torch import TorchExecutor
        from runtime.scheduler import BatchScheduler

        manager = MemoryManager(**memory, device=device, link_gbps=link_gbps,  # type: ignore[arg-type]
                                link_latency_us=link_latency_us)
        shared_prefill = options.pop("shared_prefill", 0)
        ex = TorchExecutor(manager, model=model, device=device, dtype=dtype, **options)
        admission = MemoryAdmission(manager, ex.memory_objects)
        scheduler = BatchScheduler(
            ex.cache, ex.max_num_seqs, ex.max_batch_tokens, admission, prefixes=ex.prefixes,
            reclaim=admission.reclaim_prefix_blocks(ex.cache.block_nbytes),
            shared_prefill=shared_prefill)
        return Engine(ex, scheduler, admission)
    if executor == "modeled":  # no tensors: device and dtype come from the hardware profile
        return _build_modeled(model, memory, **options)
    raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")


def _build_modeled(model: str, memory: dict[str, Any], *, hardware_profile: str = "H100",
                   preempt_prefetch: bool = True, decode_runs: bool = True, cost: Any = None,
                   hardware_overrides: dict[str, float] | None = None,
                   shared_prefill: int = 0, **options: Any) -> Engine:
    """The modeled engine: the manager on a virtual link whose clock the executor advances.

    ``decode_runs=False`` steps decodes one by one even where a run could take them at once
    (same modeled results; for checking that).
    """
    from runtime.cost_model import CostModel, hardware
    from runtime.executors.modeled import ModeledCopyEngine, ModeledExecutor, VirtualClock
    from runtime.model.profiles import profile
    from runtime.scheduler import BatchScheduler

    config = profile(model)
    cost = cost or CostModel(hardware(hardware_profile, **(hardware_overrides or {})), config)
    link = ModeledCopyEngine(VirtualClock(), cost, preempt=preempt_prefetch)
    manager = MemoryManager(**memory, copy=link, virtual_disk=True)
    ex = ModeledExecutor(manager, link, model, config, cost, **options)
    admission = MemoryAdmission(manager, ex.memory_objects)
    reclaim = None if ex.prefixes is None else \
        admission.reclaim_prefix_blocks(ex.prefixes.block_nbytes)
    scheduler = BatchScheduler(ex.cache, ex.max_num_seqs, ex.max_batch_tokens, admission,
                               prefixes=ex.prefixes, reclaim=reclaim,
                               decode_horizon=ex.decode_horizon if decode_runs else None,
                               shared_prefill=shared_prefill)
    return Engine(ex, scheduler, admission)
