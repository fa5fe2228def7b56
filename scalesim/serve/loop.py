"""The single engine loop: one thread owns the engine, every HTTP request goes through it.

The engine (an :class:`~runtime.interface.EngineInterface`: one engine or a replica set) is not
thread-safe and should not be: :class:`EngineLoop` runs it on one thread and
the HTTP handlers (on the asyncio event loop) talk to it through a command queue. Between two
iterations the thread takes every queued command (submit a request, cancel one, apply hints),
then runs one :meth:`~runtime.interface.EngineInterface.step`; requests that arrive while others decode
join the running batch at the next step, so concurrent HTTP clients are batched together
(continuous batching). Each request's events (``accepted`` once it is in the engine, or an
error if it cannot be; text deltas for streaming; then its final
:class:`~runtime.request.Completion` or an :class:`~scalesim.serve.errors.APIError`) go back to
the handler's event loop through an ``asyncio.Queue``.

Nothing slow for one request runs on the engine thread. A request is tokenized, checked
against the context and given its output budget on a small pool of tokenizer threads
(:data:`TOKENIZER_THREADS`), and handed to the engine thread with its token ids
(:attr:`~runtime.request.Request.encoded`): a huge prompt keeps one tokenizer thread busy, while
the engine decodes and the other threads tokenize the small requests behind it. Embeddings
(:meth:`EngineLoop.embed`) are made on that pool too and computed on the engine thread one chunk
(at most a batch's tokens) between two iterations, so they delay decoding by one forward at a
time.

A fault of one request fails that request alone: the engine isolates it (see
:mod:`runtime.engine`) and its completion comes back failed, a 400 when the request was at
fault and a 500 when the engine was. Only an exception out of the engine's iteration itself (its
scheduler or memory manager, not one request) leaves the engine in an unknown state: then every
request in flight fails with a 500 and the server answers 503 from then on.

Admission is bounded: at most ``max_pending`` requests are queued, tokenizing or running, and
one more is refused at once with a 429 and ``Retry-After``. A cancelled request (its client went
away) is failed in the engine between iterations, which frees its KV blocks and memory objects.
:meth:`EngineLoop.drain` stops taking new requests and returns once the last one finished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from runtime import Completion, Request, RequestError, SamplingParams
from runtime.interface import EngineInterface
from scalesim.serve.errors import APIError, bad_request
from scalesim.serve.hints import HintedDistance
from scalesim.serve.metrics import ServeMetrics
from scalesim.serve.recording import ServeRecorder

if TYPE_CHECKING:  # torch is imported by the engines that make embeddings
    from runtime.embedding import EmbeddingPass

log = logging.getLogger("scalesim.serve")

CANCELLED = "cancelled: the client disconnected"
#: threads that tokenize requests (and make embedding passes) off the engine thread: one huge
#: prompt occupies one of them, the small requests behind it take the others
TOKENIZER_THREADS = 4


def _emit(aio: asyncio.AbstractEventLoop, events: asyncio.Queue[tuple[str, Any]], kind: str,
          value: Any) -> None:
    """Hand an event to a handler's event loop (from another thread)."""
    try:
        aio.call_soon_threadsafe(events.put_nowait, (kind, value))
    except RuntimeError:  # the event loop closed: nobody is listening any more
        log.debug("dropped a %s event", kind)


@dataclass
class Job:
    """One HTTP request on its way through the engine."""

    request: Request
    endpoint: str
    events: asyncio.Queue[tuple[str, Any]]
    aio: asyncio.AbstractEventLoop
    max_tokens: int | None
    stream: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    submit_time: float = 0.0
    sent_text: str = ""
    done: bool = False
    #: the client went away (checked when the job reaches the engine thread)
    cancelled: bool = False

    def emit(self, kind: str, value: Any) -> None:
        """Hand an event to the handler's event loop (from the engine thread)."""
        _emit(self.aio, self.events, kind, value)


@dataclass
class EmbeddingJob:
    """One ``/v1/embeddings`` request: its inputs (texts or token ids), then their vectors.

    Its events: ``("done", (vectors, tokens))`` or ``("error", APIError)``."""

    inputs: list[str | list[int]]
    events: asyncio.Queue[tuple[str, Any]]
    aio: asyncio.AbstractEventLoop
    info: dict[str, Any] = field(default_factory=dict)
    endpoint: str = "embeddings"
    request_id: int = -1
    passes: list[EmbeddingPass] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False

    @property
    def tokens(self) -> int:
        return sum(p.num_tokens for p in self.passes)

    def emit(self, kind: str, value: Any) -> None:
        _emit(self.aio, self.events, kind, value)


class EngineLoop:
    """Runs one Engine on its own thread (see the module docstring)."""

    def __init__(self, engine: EngineInterface, *, distance: HintedDistance | None = None,
                 max_pending: int = 256, default_max_tokens: int = 256,
                 max_tokens_cap: int | None = None,
                 recorder: ServeRecorder | None = None, pace: float = 0.0) -> None:
        self.engine = engine
        self.distance = distance
        self.max_pending = max_pending
        self.default_max_tokens = default_max_tokens
        #: the server's hard cap on a request's output tokens (a client asking 5,000 gets this)
        self.max_tokens_cap = max_tokens_cap
        self.recorder = recorder
        self.pace = pace
        self.metrics = ServeMetrics()
        self.healthy = True
        self.error: str | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._ids = 0
        self._pending = 0  # submitted and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._draining = False
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, "scalesim-tokenize")
        #: embedding requests whose passes the engine thread computes, first come first served
        self._embeddings: deque[EmbeddingJob] = deque()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="scalesim-engine", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def _reserve(self, endpoint: str, info: dict[str, Any]) -> int:
        """Count one more request in; its id. Raises a 429 when full, a 503 while draining
        or after the engine failed."""
        with self._lock:
            if self._draining or not self.healthy:
                raise APIError(503, "the server is shutting down", type="server_error") \
                    if self._draining else self._unavailable()
            if self._pending >= self.max_pending:
                self.metrics.rejected_full += 1
                full = APIError(429, f"the server queue is full ({self.max_pending} requests "
                               "queued or running); retry later", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
                if self.recorder is not None:
                    self.recorder.refused(endpoint, 429, full.message, info)
                raise full
            self._pending += 1
            self._ids += 1
            self._idle.clear()
            return self._ids

    def submit(self, job: Job) -> int:
        """Queue ``job``; its request id. Raises a 429 when full, a 503 while draining. The job
        is tokenized on a tokenizer thread, then handed to the engine thread."""
        job.request.request_id = self._reserve(job.endpoint, job.info)
        self._tokenizers.submit(self._prepare, job)
        return job.request.request_id

    def embed(self, job: EmbeddingJob) -> int:
        """Queue an embedding request (see the module docstring); its request id. Raises as
        :meth:`submit` does."""
        job.request_id = self._reserve(job.endpoint, job.info)
        self._tokenizers.submit(self._prepare_embedding, job)
        return job.request_id

    def cancel(self, job: Job | EmbeddingJob) -> None:
        """Cancel ``job`` if it has not finished (its client went away)."""
        if not job.done:
            job.cancelled = True
            if isinstance(job, Job):
                self._commands.put(lambda: self._cancel(job))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between iterations; its result as a future."""
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # reported to the caller, the loop goes on
                future.set_exception(exc)
        self._commands.put(run)
        return future

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait for the queued and running ones; ``True`` if done."""
        with self._lock:
            self._draining = True
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (after :meth:`drain`, nothing is lost)."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the tokenizer threads ----------------------------------------------------------------

    def _prepare(self, job: Job) -> None:
        """Tokenize ``job``, check it against the context and fix its output budget, then
        hand it to the engine thread (or its error: the engine thread answers both)."""
        request = job.request
        try:
            prefix_ids, prompt_ids = self.engine.encode(request.prefix, request.prompt,
                                                        request.history)
            prompt_tokens = len(prefix_ids) + len(prompt_ids)
            context = self.engine.max_context
            room = context - prompt_tokens
            if room < 1:
                field = "messages" if job.endpoint == "chat" else "prompt"
                raise bad_request(field, f"{field}: the prompt has {prompt_tokens} tokens; the "
                                  f"model context is {context}")
            wanted = job.max_tokens or self.default_max_tokens
            if self.max_tokens_cap is not None:
                wanted = min(wanted, self.max_tokens_cap)
            s = request.sampling
            request.sampling = SamplingParams(max_tokens=min(wanted, room),
                                              temperature=s.temperature, top_p=s.top_p,
                                              top_k=s.top_k, seed=s.seed, stop=s.stop)
            request.encoded = (prefix_ids, prompt_ids)
        except APIError as exc:
            error = exc
        except RequestError as exc:
            error = bad_request(None, str(exc))
        except Exception as exc:  # a tokenizer that chokes on the input
            field = "messages" if job.endpoint == "chat" else "prompt"
            error = bad_request(field, f"{field}: could not tokenize: {exc}")
        else:
            self._commands.put(lambda: self._submit(job))
            return
        self._commands.put(lambda: self._finish_early(job, error))

    def _prepare_embedding(self, job: EmbeddingJob) -> None:
        """Tokenize an embedding request's inputs into passes, then queue it for the engine
        thread (or its error)."""
        try:
            for i, item in enumerate(job.inputs):
                try:
                    job.passes.append(self.engine.embedding(item))
                except RequestError as exc:
                    param = "input" if len(job.inputs) == 1 else f"input.{i}"
                    raise bad_request(param, f"{param}: {exc}") from None
        except APIError as exc:
            error = exc
        except Exception as exc:  # a tokenizer that chokes on the input
            error = bad_request("input", f"input: could not tokenize: {exc}")
        else:
            self._commands.put(lambda: self._queue_embedding(job))
            return
        self._commands.put(lambda: self._finish_early(job, error))

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.healthy and (bool(self._jobs) or bool(self._embeddings)
                                     or self.engine.has_work())
            try:
                command = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                command = None
            ran = command is not None
            try:
                while command is not None:
                    command()
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            if ran and self.healthy and not self.engine.has_work():
                # Idle, but hints may have arrived: prefetch for them now, not at the next call.
                self.engine.tick()
            if self._embeddings and self.healthy:
                self._embed_chunk()
            if self.healthy and self.engine.has_work():
                try:
                    self._step()
                except Exception as exc:  # the engine is in an unknown state: fail everyone
                    log.exception("engine iteration failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
            if self.distance is not None:
                self.distance.expire()

    def _submit(self, job: Job) -> None:
        """Hand a tokenized job to the engine."""
        request = job.request
        if job.cancelled:  # its client left while it was being tokenized
            self.metrics.cancelled += 1
            self._finish_early(job, APIError(499, CANCELLED, type="client_closed"),
                               outcome="cancelled")
            return
        if not self.healthy:  # the engine failed while this job was being tokenized
            self._finish_early(job, self._unavailable())
            return
        job.submit_time = self.recorder.now() if self.recorder else time.perf_counter()
        request.stream = job.stream
        try:
            self.engine.submit(request)
        except Exception as exc:  # the engine refuses this request alone
            log.exception("request %s could not be submitted", request.request_id)
            self._finish_early(job, APIError(500, f"internal error at submission: "
                                             f"{type(exc).__name__}: {exc}", type="server_error"),
                               outcome="error")
            return
        self._jobs[request.request_id] = job
        if self.distance is not None:
            self.distance.on_submit(request.agent_id)
        job.emit("accepted", request.sampling.max_tokens)

    def _unavailable(self) -> APIError:
        return APIError(503, f"the engine failed: {self.error}", type="server_error")

    def _queue_embedding(self, job: EmbeddingJob) -> None:
        if self.healthy:
            self._embeddings.append(job)
        else:
            self._finish_early(job, self._unavailable())

    def _embed_chunk(self) -> None:
        """Compute one chunk of the first embedding request; answer it once it is complete."""
        job = self._embeddings[0]
        try:
            if job.cancelled:
                raise APIError(499, CANCELLED, type="client_closed")
            current = job.passes[len(job.vectors)]
            if current.step():
                job.vectors.append(current.vector())
        except Exception as exc:
            self._embeddings.popleft()
            if isinstance(exc, APIError):
                error = exc
            else:  # the model failed on this input: this request alone fails
                log.exception("embedding request %s failed", job.request_id)
                error = APIError(500, f"internal error while embedding: "
                                 f"{type(exc).__name__}: {exc}", type="server_error")
            self._finish_early(job, error, outcome="cancelled" if error.status == 499
                               else "error")
            return
        if len(job.vectors) < len(job.passes):
            return
        self._embeddings.popleft()
        self.metrics.count(job.endpoint, "ok")
        self.metrics.embedding_tokens += job.tokens
        if self.recorder is not None:
            self.recorder.refused(job.endpoint, 200, None, {**job.info,
                                                            "request_id": job.request_id},
                                  outcome="ok")
        job.emit("done", (job.vectors, job.tokens))
        self._finished(job)

    def _cancel(self, job: Job) -> None:
        if job.done or job.request.request_id not in self._jobs:
            return
        if self.engine.cancel(job.request.request_id, CANCELLED):
            self.metrics.cancelled += 1

    def _step(self) -> None:
        result = self.engine.step()
        if self.pace > 0 and result.modeled_s is not None:  # take the modeled time in wall time
            time.sleep(result.modeled_s * self.pace)
        self.metrics.iteration(result.batch, result.waiting, result.running)
        for request_id, text in result.partial.items():
            job = self._jobs.get(request_id)
            if job is not None:
                self._stream(job, text)
        for completion in result.finished:
            self._complete(completion)

    def _stream(self, job: Job, text: str) -> None:
        """Send what is new in ``text``, holding back what a stop string could still cut."""
        hold = max((len(s) for s in job.request.sampling.stop), default=1) - 1
        safe = text[:len(text) - hold] if hold else text
        while safe.endswith("\ufffd"):  # half of a multi-byte character
            safe = safe[:-1]
        if len(safe) > len(job.sent_text) and safe.startswith(job.sent_text):
            job.emit("delta", safe[len(job.sent_text):])
            job.sent_text = safe

    def _complete(self, completion: Completion) -> None:
        job = self._jobs.pop(completion.request_id, None)
        if job is None:
            return
        if self.distance is not None:
            self.distance.on_finish(job.request.agent_id)
        if completion.ok:
            outcome, status = "ok", 200
        elif completion.error == CANCELLED:
            outcome, status = "cancelled", 499
        else:
            outcome, status = "error", 500 if completion.internal_error else 400
        self.metrics.finished(job.endpoint, completion, outcome)
        if self.recorder is not None:
            try:
                self.recorder.call(job.request, job.submit_time, completion,
                                   {**job.info, "outcome": outcome, "status": status})
            except Exception:  # a full disk must not take the server down
                log.exception("could not record request %s", completion.request_id)
        if job.stream and completion.ok and completion.text.startswith(job.sent_text):
            rest = completion.text[len(job.sent_text):]
            if rest:
                job.emit("delta", rest)
        if completion.ok:
            job.emit("done", completion)
        else:
            # The engine fails a request alone for what is wrong with it (an adapter that
            # does not load, one changed while in use: a client error), or for its own fault
            # on this request alone (a server error).
            error = APIError(status, f"the request failed: {completion.error}",
                             type="server_error" if completion.internal_error
                             else "invalid_request_error")
            error.recorded = True  # in requests.parquet already, by recorder.call
            job.emit("error", error)
        self._finished(job)

    def refused(self, endpoint: str, error: APIError, info: dict[str, Any] | None = None,
                outcome: str = "refused") -> None:
        """A request answered with ``error`` before the engine served it (or, for an
        embedding, while it did): counted in the metrics and recorded in the run directory's
        requests."""
        # Refused requests are counted by status; those that failed on their way by outcome,
        # as the engine's own failures and cancellations are.
        self.metrics.count(endpoint, str(error.status) if outcome == "refused" else outcome)
        if self.recorder is not None:
            self.recorder.refused(endpoint, error.status, error.message, info, outcome=outcome)

    def _finish_early(self, job: Job | EmbeddingJob, error: APIError,
                      outcome: str = "refused") -> None:
        rid = job.request.request_id if isinstance(job, Job) else job.request_id
        self.refused(job.endpoint, error, {**job.info, "request_id": rid}, outcome)
        error.recorded = True
        job.emit("error", error)
        self._finished(job)

    def _finished(self, job: Job | EmbeddingJob) -> None:
        job.done = True
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    def _fail_all(self, error: str) -> None:
        self.healthy, self.error = False, error
        failed = APIError(500, f"the engine failed: {error}", type="server_error")
        for job in list(self._jobs.values()):
            self.refused(job.endpoint, failed, {**job.info, "request_id": job.request.request_id},
                         outcome="error")
            failed.recorded = True
            job.emit("error", failed)
            self._finished(job)
        self._jobs.clear()
        while self._embeddings:
            self._finish_early(self._embeddings.popleft(), failed, outcome="error")
