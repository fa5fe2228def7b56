"""The one engine interface every front end drives.

The simulation (:mod:`scalesim.simulation`), the server (:mod:`scalesim.serve`), the replica
driver (:mod:`runtime.replicas`) and the preflight checks all talk to an engine through
:class:`EngineInterface` and nothing else: they never reach its executor, scheduler or memory
admission. Two classes implement it, :class:`~runtime.engine.Engine` (one executor) and
:class:`~runtime.replicas.ReplicaSet` (several engines driven as one).

What goes in: requests (:meth:`~EngineInterface.submit`, :meth:`~EngineInterface.cancel`), the
agents a run will have (:meth:`~EngineInterface.declare`) and where invocation distances come
from (:meth:`~EngineInterface.use_distance`). What comes out: one :class:`StepResult` per
iteration, the :class:`EngineEvent` records handed to listeners as they happen (memory
operations and timed steps), and the ``summary.json`` sections of :meth:`~EngineInterface.report`.
Its :class:`EngineClock` says what time it is on the engine's own scale: wall seconds, or the
modeled executor's virtual clock.
"""

from __future__ import annotations

import time
from collections import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from runtime.memory.distance import DistanceSource
from runtime.memory.events import MemoryEvent
from runtime.model.profiles import ModelConfig
from runtime.request import Completion, Request, Turn


if TYPE_CHECKING:  # torch is imported only where embeddings are made
    from runtime.embedding import EmbeddingPass

@dataclass
class StepResult:
    """What one engine iteration did."""

    #: the requests that finished in it (failed ones too), in request-id order
    finished: list[Completion] = field(default_factory=list)
    #: for each still running request that asked to stream (``Request.stream``), its text so far
    partial: dict[int, str] = field(default_factory=dict)
    #: sequences that ran in the iteration (those still running plus those it finished)
    batch: int = 0
    #: model steps the iteration stood for (a decode run takes several at once; 0: no batch)
    #: and the tokens they computed: with ``batch``, the engine's occupancy
    steps: int = 0
    tokens: int = 0
    #: requests still waiting for admission, and still running, after it
    waiting: int = 0
    running: int = 0
    #: how far the modeled clock moved in it (``None``: not a modeled engine)
    modeled_s: float | None = None


@dataclass(frozen=True)
class StepTimed:
    """An engine iteration's forward pass, timed (an :class:`EngineEvent`).

    ``wall_s`` covers the executor's work only: scheduling, admission and finishing stay out,
    so benchmarks compare the model's compute.
    """

    #: which engine replica ran it (0 for a single engine)
    replica: int
    #: sequences in the batch and the tokens they computed
    sequences: int
    tokens: int
    #: the new tokens the prefill chunks computed (the rest of ``tokens`` are decodes)
    prefill_tokens: int
    wall_s: float
    #: the modeled time of the iteration (``None``: not a modeled engine)
    modeled_s: float | None = None


#: What an engine's listeners receive.
EngineEvent = Union[MemoryEvent, StepTimed]
EngineListener = Callable[[EngineEvent], None]


class EngineClock(Protocol):
    """The engine's time: wall seconds for a real engine, the virtual clock for a modeled one."""

    #: whether :meth:`now` is modeled time (then :meth:`wait_until` moves it)
    modeled: bool

    def now(self) -> float: ...

    def wait_until(self, t: float) -> None:
        """Let the clock reach ``t`` (a modeled engine idles until then; a real one ignores it)."""


class WallClock:
    """An :class:`EngineClock` of wall seconds since it was made; nothing to wait for."""

    modeled = False

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, t: float) -> None:
        pass


class EngineInterface(Protocol):
    """What every front end drives (see the module docstring)."""

    @property
    def clock(self) -> EngineClock: ...

    @property
    def max_context(self) -> int:
        """Prompt plus output tokens one request may have at most."""

    @property
    def structured_output(self) -> bool:
        """Whether requests may carry a :class:`~runtime.constrained.Constraint` (the executor
        samples real tokens with a tokenizer)."""

    @property
    def embeddings(self) -> bool:
        """Whether :meth:`embedding` makes embeddings (the executor computes hidden states)."""

    @property
    def policy_name(self) -> str:
        """The memory policy's name (``lru``, ``scalesim``, ``belady``, ...)."""

    @property
    def uses_distance(self) -> bool:
        """Whether the memory policy reads invocation distances."""

    def prompt_tokens(self, prefix: str, prompt: str, history: abc.Sequence[Turn] = ()) -> int:
        """How many tokens ``prefix``, ``history`` and ``prompt`` take as one request's input;
        raises what the tokenizer raises for input it cannot take."""

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)`` of a request, as the engine tokenizes it at submission;
        safe to call from any thread, so that a caller can tokenize off the engine's thread and
        hand the ids over in :attr:`~runtime.request.Request.encoded`. Raises what the
        tokenizer raises for input it cannot take."""

    def architecture(self) -> ModelConfig | None:
        """The model's shapes (for checking adapters), where the engine knows them."""

    def embedding(self, input: str | list[int]) -> EmbeddingPass:
        """The pooled last-hidden-state embedding of ``input`` (text or token ids), as a pass
        the caller steps on the engine's thread between iterations (making it, which
        tokenizes, is safe on any thread); a :class:`~runtime.request.RequestError` where the
        engine computes no hidden states or the input cannot be embedded."""

    def submit(self, request: Request) -> int:
        """Queue ``request``; its request id (assigned when unset). A request that cannot be
        served comes back failed from the next :meth:`step`."""

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """Fail a queued or running request at the next :meth:`step`; ``False`` if unknown."""

    def declare(self, agent_id: str, prefix: str, adapter: str | None = None) -> None:
        """Make an agent's memory objects known before its first call (prefetch, preload)."""

    def use_distance(self, source: DistanceSource, clock: Callable[[], float] | None = None
                     ) -> None:
        """Read invocation distances from ``source``; ``clock`` gives the current time on the
        source's scale where the engine needs it (engine replicas)."""

    def place(self, agent_id: str, replica: int) -> None:
        """Make engine replica ``replica`` the home of ``agent_id`` (one engine ignores it)."""

    def listen(self, listener: EngineListener) -> None:
        """Call ``listener`` with every :class:`EngineEvent` from now on."""

    def has_work(self) -> bool: ...

    def step(self) -> StepResult:
        """Run one iteration."""

    def tick(self) -> None:
        """Housekeeping while idle: install finished copies, prefetch for new distances."""

    def report(self) -> dict[str, Any]:
        """The engine's ``summary.json`` sections."""

    def close(self) -> None: ...
