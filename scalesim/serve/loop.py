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

Admission is bounded: at most ``max_pending`` requests are queued or running, and one more is
refused at once with a 429 and ``Retry-After``. A cancelled request (its client went away) is
failed in the engine between iterations, which frees its KV blocks and memory objects.
:meth:`EngineLoop.drain` stops taking new requests and returns once the last one finished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime import Completion, Request, SamplingParams
from runtime.interface import EngineInterface
from scalesim.serve.errors import APIError, bad_request
from scalesim.serve.hints import HintedDistance
from scalesim.serve.metrics import ServeMetrics
from scalesim.serve.recording import ServeRecorder

log = logging.getLogger("scalesim.serve")

CANCELLED = "cancelled: the client disconnected"


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

    def emit(self, kind: str, value: Any) -> None:
        """Hand an event to the handler's event loop (from the engine thread)."""
        try:
            self.aio.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed: nobody is listening any more
            log.debug("dropped %s event of request %s", kind, self.request.request_id)


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

    def submit(self, job: Job) -> int:
        """Queue ``job``; its request id. Raises a 429 when full, a 503 while draining."""
        with self._lock:
            if self._draining or not self.healthy:
                raise APIError(503, "the server is shutting down" if self._draining
                               else f"the engine failed: {self.error}", type="server_error")
            if self._pending >= self.max_pending:
                self.metrics.rejected_full += 1
                full = APIError(429, f"the server queue is full ({self.max_pending} requests "
                               "queued or running); retry later", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
                if self.recorder is not None:
                    self.recorder.refused(job.endpoint, 429, full.message, job.info)
                raise full
            self._pending += 1
            self._ids += 1
            job.request.request_id = self._ids
            self._idle.clear()
        self._commands.put(lambda: self._submit(job))
        return job.request.request_id

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` if it has not finished (its client went away)."""
        if not job.done:
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
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.healthy and (bool(self._jobs) or self.engine.has_work())
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
            if self.healthy and self.engine.has_work():
                try:
                    self._step()
                except Exception as exc:  # the engine is in an unknown state: fail everyone
                    log.exception("engine iteration failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
            if self.distance is not None:
                self.distance.expire()

    def _submit(self, job: Job) -> None:
        request = job.request
        try:
            prompt_tokens = self.engine.prompt_tokens(request.prefix, request.prompt,
                                                      request.history)
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
        except APIError as exc:
            self._finish_early(job, exc)
            return
        except Exception as exc:  # a tokenizer that chokes on the input
            self._finish_early(job, bad_request("messages", f"could not tokenize: {exc}"))
            return
        job.submit_time = self.recorder.now() if self.recorder else time.perf_counter()
        request.stream = job.stream
        self._jobs[request.request_id] = job
        if self.distance is not None:
            self.distance.on_submit(request.agent_id)
        self.engine.submit(request)
        job.emit("accepted", request.sampling.max_tokens)

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
            outcome = "ok"
        elif completion.error == CANCELLED:
            outcome = "cancelled"
        else:
            outcome = "error"
        self.metrics.finished(job.endpoint, completion, outcome)
        if self.recorder is not None:
            try:
                self.recorder.call(job.request, job.submit_time, completion,
                                   {**job.info, "outcome": outcome})
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
            # does not load, one changed while in use): a client error.
            job.emit("error", APIError(400, f"the request failed: {completion.error}"))
        self._finished(job)

    def refused(self, endpoint: str, error: APIError, info: dict[str, Any] | None = None) -> None:
        """A request answered with ``error`` before the engine served it: counted in the
        metrics and recorded in the run directory's requests."""
        self.metrics.refused(endpoint, str(error.status))
        if self.recorder is not None:
            self.recorder.refused(endpoint, error.status, error.message, info)

    def _finish_early(self, job: Job, error: APIError) -> None:
        self.refused(job.endpoint, error, job.info)
        job.emit("error", error)
        self._finished(job)

    def _finished(self, job: Job) -> None:
        job.done = True
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    def _fail_all(self, error: str) -> None:
        self.healthy, self.error = False, error
        for job in list(self._jobs.values()):
            job.emit("error", APIError(500, f"the engine failed: {error}", type="server_error"))
            self._finished(job)
        self._jobs.clear()
