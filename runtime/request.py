"""What goes into the engine and what comes out of it.

A :class:`Request` is one LLM call of one agent: the agent's stable *prefix* (persona or system
text, whose KV the engine may keep between calls), the earlier turns of its conversation (the
*history*, if it keeps one), the new *prompt*, the sampling parameters and the agent's private
memory objects (an adapter). A :class:`Completion` is the engine's answer,
with the token counts and wall-clock times the trace records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.constrained import Constraint


#: One earlier chat turn, in the OpenAI message shape: ``role`` (``user``, ``assistant``, ``tool``)
#: and ``content`` (text), and optionally ``name``, ``tool_calls`` and ``tool_call_id``.
Turn = Mapping[str, Any]


class RequestError(RuntimeError):
    """A single request could not be served (bad adapter, prompt too long, ...).

    The engine reports it on that request's :class:`Completion`; other requests continue.
    """


#: temperatures below this decode greedily (as in vLLM)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` (or below :data:`GREEDY_BELOW`) means greedy
    decoding."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: keep generating past end-of-sequence tokens up to ``max_tokens`` (fixed-length benchmarks)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        # A generator's seed is a 64-bit number; a larger one would fail inside an engine step.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise RequestError(f"seed must be a 64-bit integer (-2**63 .. 2**64-1), got {self.seed}")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the distribution is the argmax's anyway, and float32 logits divided by a
        # temperature that small overflow to infinities that no distribution can be drawn from.
        return self.temperature < GREEDY_BELOW


@dataclass
class Request:
    """One LLM call of one agent.

    ``prefix`` is rendered as the system turn of the chat template, ``history`` as the turns
    that follow it (each in its own role) and ``prompt`` as the last user turn, after which the
    model answers as the assistant. The engine guarantees that the prefix tokens are a
    token-prefix of the full input so that their KV can be reused across calls of the same
    agent; an agent that sends its conversation so far as ``history``, its last reply included,
    finds its previous request's tokens again at the start of the next one. ``adapter`` is the
    path of a PEFT-format LoRA adapter directory, or ``None`` for the base model. ``due``
    orders requests for the scheduler (see the field).
    """

    agent_id: str
    prompt: str
    prefix: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: int = -1
    #: report the text generated so far after every engine iteration (``StepResult.partial``)
    stream: bool = False
    #: the earlier turns between the system turn and ``prompt``, oldest first (:data:`Turn`)
    history: tuple[dict[str, Any], ...] = ()
    #: when the caller needs the reply, on the caller's own clock (a simulation's due time: the
    #: call's submit time plus its duration); the scheduler admits the earliest due first.
    #: ``None`` (a server's requests): after every dated request, first come first served
    due: float | None = None
    #: what the reply must be (a JSON schema, choices, a tool call: :mod:`runtime.constrained`);
    #: ``None``, the default, samples freely (no mask is computed)
    constraint: Constraint | None = None
    #: ``(prefix_ids, prompt_ids)`` when the caller tokenized the request already, with the
    #: engine's own :meth:`~runtime.interface.EngineInterface.encode` (a server does it on a
    #: worker thread, so that a huge prompt never stalls the engine's); ``None``: the engine
    #: tokenizes at submission
    encoded: tuple[list[int], list[int]] | None = None


@dataclass
class MemoryStats:
    """Per-request memory outcome: which of its objects were resident when it ran."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    bytes_loaded: int = 0
    stall_s: float = 0.0


@dataclass
class Completion:
    """The engine's answer to one :class:`Request`.

    Wall times are ``time.perf_counter()`` values. ``error`` is set (and ``finish_reason`` is
    ``"error"``) when the request failed; the text is then empty. ``internal_error`` says whose
    fault that was: the engine's (an unexpected exception while it served this request alone),
    not the request's (a :class:`RequestError`: an adapter that does not load, a prompt too
    long, a reply that broke its grammar).
    """

    request_id: int
    agent_id: str
    text: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish_reason: str
    submit_wall: float
    first_token_wall: float | None
    finish_wall: float
    memory: MemoryStats = field(default_factory=MemoryStats)
    error: str | None = None
    internal_error: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None
