"""The asynchronous copy engine: moves memory objects onto the device while the model computes.

One worker thread serves a priority queue of :class:`Transfer` jobs: urgent loads (a request is
waiting for them) first, then prefetches nearest-distance first. A job fetches its source tensors
(a host copy, a disk file, or the object's origin) and copies them to the device in chunks. An
urgent job that arrives while a prefetch is copying makes that prefetch abort at its next chunk
boundary, so a request never waits behind a speculative transfer.

On CUDA the chunks are copied on a dedicated stream from pinned host memory, and a job is done
when the stream has finished it. On the CPU the "device" is a budgeted region of RAM and the copy
is a memcpy; an optional *emulated link* (bandwidth in GB/s and a per-transfer latency in µs)
makes each job take as long as it would over a PCIe-like link, so prefetch overlap is measurable
without a GPU. The link is paced against a running deadline rather than one sleep per chunk, so
short chunks do not accumulate sleep overhead.

:class:`CopyLink` is what the memory manager needs of a copy engine, clock included: the
modeled executor's virtual link (:mod:`runtime.executors.modeled.link`) implements the same
protocol in modeled time, so the manager runs unchanged over either.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Protocol

import torch

from runtime.memory.objects import AgentMemory, Tensors


class Signal(Protocol):
    """Set once a transfer finished or aborted (a ``threading.Event``, or a virtual one)."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Transfer:
    """One load of one object onto the device; ``done`` is set when it finished or aborted."""

    def __init__(self, obj: AgentMemory, source: str, fetch: Callable[[], Tensors], *,
                 urgent: bool, distance: float) -> None:
        self.obj = obj
        self.source = source
        self.fetch = fetch
        self.urgent = urgent
        self.distance = distance
        self.done: Signal = threading.Event()
        self.result: Tensors | None = None
        self.error: BaseException | None = None
        self.aborted = False
        self.abort_requested = False
        self.started = False
        self.seconds = 0.0
        self.order = 0
        #: when the copy began (the modeled link's timeline)
        self.started_at = 0.0

    def __repr__(self) -> str:
        state = "done" if self.done.is_set() else "running" if self.started else "queued"
        return f"<Transfer {self.obj.key} from {self.source} {'urgent' if self.urgent else ''} {state}>"


#: Chunk size of a copy on the CPU. Chunks are copied as numpy byte views: a single-threaded
#: memcpy (42 GB/s on this project's VM in 256 KiB chunks). A torch copy of more than 32,768
#: elements would run in parallel, and on the copy thread that starts a second OpenMP team whose
#: spinning workers take the cores the model computes on: bench_policies measured +45% compute
#: time for the same batches (town, 16 villagers, lru, host tier) with 1 MiB torch chunks.
CPU_CHUNK_BYTES = 1 << 18
#: Chunk size on CUDA, where a chunk is one asynchronous copy on the stream.
CUDA_CHUNK_BYTES = 1 << 20


class CopyLink(Protocol):
    """What the memory manager asks of a copy engine: jobs in priority order, and a clock."""

    busy_s: float

    def now(self) -> float:
        """The clock stalls are measured on (seconds)."""

    def submit(self, transfer: Transfer) -> Transfer:
        """Queue ``transfer``; an urgent one goes before every prefetch."""

    def promote(self, transfer: Transfer) -> None:
        """Make a queued or running prefetch urgent (a request now waits for it)."""

    def cancel(self, transfer: Transfer) -> None:
        """Abort a prefetch; ``transfer.done`` is set once it has stopped."""

    def close(self) -> None:
        """Stop the worker; queued transfers abort."""


class CopyEngine:
    """A single worker that performs :class:`Transfer` jobs in priority order."""

    def __init__(self, device: str | torch.device = "cpu", *, link_gbps: float | None = None,
                 link_latency_us: float = 0.0, chunk_bytes: int | None = None) -> None:
        if link_gbps is not None and link_gbps <= 0:
            raise ValueError(f"link_gbps must be > 0, got {link_gbps}")
        self.device = torch.device(device)
        self.link_gbps = link_gbps
        self.link_latency_s = link_latency_us * 1e-6
        if chunk_bytes is None:
            chunk_bytes = CUDA_CHUNK_BYTES if self.device.type == "cuda" else CPU_CHUNK_BYTES
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queue: list[Transfer] = []
        self._urgent_queued = 0
        self._orders = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._work, name="scalesim-copy", daemon=True)
        self._thread.start()

    # -- what the manager calls ---------------------------------------------------------------

    def now(self) -> float:
        return time.perf_counter()

    def submit(self, transfer: Transfer) -> Transfer:
        with self._cond:
            if self._closed:
                raise RuntimeError("copy engine is closed")
            transfer.order = next(self._orders)
            self._queue.append(transfer)
            self._urgent_queued += transfer.urgent
            self._cond.notify()
        return transfer

    def promote(self, transfer: Transfer) -> None:
        """Make a queued or running prefetch urgent (a request now waits for it)."""
        with self._cond:
            if not transfer.urgent:
                transfer.urgent = True
                if transfer in self._queue:
                    self._urgent_queued += 1

    def cancel(self, transfer: Transfer) -> None:
        """Abort a prefetch: drop it if queued, stop it at the next chunk if running."""
        with self._cond:
            if transfer in self._queue:
                self._queue.remove(transfer)
                self._urgent_queued -= transfer.urgent
                transfer.aborted = True
                transfer.done.set()
            else:
                transfer.abort_requested = True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for t in self._queue:
                t.aborted = True
                t.done.set()
            self._queue.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = min(self._queue, key=lambda t: (not t.urgent, t.distance, t.order))
                self._queue.remove(job)
                self._urgent_queued -= job.urgent
                job.started = True
            start = time.perf_counter()
            try:
                job.result = self._copy(job)
            except BaseException as exc:  # reported to the waiting request, not raised here
                job.error = exc
            job.seconds = time.perf_counter() - start
            self.busy_s += job.seconds
            job.done.set()

    def _should_abort(self, job: Transfer) -> bool:
        return job.abort_requested or (not job.urgent and self._urgent_queued > 0)

    def _chunk_copier(self, src: torch.Tensor, dst: torch.Tensor) -> Callable[[int, int], None]:
        """A function copying bytes ``[lo, hi)`` of flat ``src`` into flat ``dst``."""
        if self.stream is not None:
            size = src.element_size()  # chunk bounds are whole elements (see _copy)

            def copy_on_stream(lo: int, hi: int) -> None:
                with torch.cuda.stream(self.stream):
                    dst[lo // size:hi // size].copy_(src[lo // size:hi // size], non_blocking=True)
            return copy_on_stream
        src_bytes, dst_bytes = src.view(torch.uint8).numpy(), dst.view(torch.uint8).numpy()

        def memcpy(lo: int, hi: int) -> None:
            dst_bytes[lo:hi] = src_bytes[lo:hi]
        return memcpy

    def _copy(self, job: Transfer) -> Tensors | None:
        source = job.fetch()
        if self.stream is None and job.source != "host" and not self.link_gbps \
                and not self.link_latency_s:
            # On the CPU a disk read or a rebuild already made a private buffer in the memory
            # the "device" is: a second memcpy would only take a core from the model.
            return {name: t.detach() for name, t in source.items()}
        start = time.perf_counter()
        owed = self.link_latency_s
        bytes_per_s = self.link_gbps * 1e9 if self.link_gbps else None
        out: Tensors = {}
        try:
            for name, tensor in source.items():
                src = tensor.detach().contiguous().reshape(-1)
                dst = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
                copy_chunk = self._chunk_copier(src, dst.reshape(-1))
                size = src.element_size()
                chunk = max(size, self.chunk_bytes // size * size)  # whole elements per chunk
                nbytes = src.numel() * size
                for lo in range(0, nbytes, chunk):
                    if self._should_abort(job):
                        job.aborted = True
                        return None
                    hi = min(lo + chunk, nbytes)
                    copy_chunk(lo, hi)
                    if bytes_per_s:
                        owed += (hi - lo) / bytes_per_s
                        delay = start + owed - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                out[name] = dst
        finally:
            # Also when aborted or failed: copies still queued on the stream write into ``dst``
            # buffers the allocator would otherwise hand out again as soon as they are dropped.
            if self.stream is not None:
                self.stream.synchronize()
        if self.stream is None and owed > 0 and not bytes_per_s:
            time.sleep(owed)  # latency only
        return out
