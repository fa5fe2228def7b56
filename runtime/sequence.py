"""A request as the engine tracks it: its token ids, its output so far and its timings.

For the paged ``torch`` executor a sequence also carries its place in the KV pool: the block table,
how many of its tokens already have KV there (``num_computed``) and how many the current iteration
computes (``chunk``). A preempted sequence loses its blocks and recomputes them later from its
tokens, outputs included.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from runtime.request import Completion, MemoryStats, Request


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued, in the running set, or done (finished or failed)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """The engine-side state of one :class:`Request`.

    ``prefix_ids`` are the tokens of the agent's stable prefix and ``prompt_ids`` the tokens that
    follow it; the model input is their concatenation. Executors append to ``output_ids`` and the
    engine decides when the sequence is finished.
    """

    request: Request
    prefix_ids: list[int]
    prompt_ids: list[int]
    submit_wall: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    first_token_wall: float | None = None
    finish_reason: str | None = None
    text: str = ""
    cached_tokens: int = 0
    memory: MemoryStats = field(default_factory=MemoryStats)
    error: str | None = None
    #: Whether the failure was the engine's, not the request's (see :class:`Completion`).
    internal_error: bool = False
    #: The agent memory objects the request holds while it runs (named once, at submission).
    memory_objects: list[Any] = field(default_factory=list)
    #: Whether the first prefix lookup reused cached KV (``None``: not looked up).
    prefix_hit: bool | None = None
    #: Paged-engine state (unused by the hf executor).
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    chunk: int = 0
    #: Whether the computed prompt has gone into the prefix cache.
    prompt_cached: bool = False
    #: The prefix cache's block chain of the prompt (made when first asked for).
    block_chain: list[int] | None = None
    generator: Any = None
    #: The grammar matcher of a constrained request (:class:`runtime.constrained.GrammarState`,
    #: made when first sampled; it follows ``output_ids``, so a preempted sequence keeps it).
    grammar: Any = None
    #: ``input_ids``, made once: prefix and prompt never change once the sequence exists, and the
    #: prefix cache reads the input several times per call (a 1,000-token persona is a copy each).
    _input_ids: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    _input_tokens: tuple[int, ...] | None = field(default=None, init=False, repr=False,
                                                  compare=False)

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def input_ids(self) -> list[int]:
        """Prefix then prompt (one list, made once; do not modify it)."""
        if self._input_ids is None:
            self._input_ids = self.prefix_ids + self.prompt_ids
        return self._input_ids

    @property
    def input_tokens(self) -> tuple[int, ...]:
        """``input_ids`` as a tuple, made once: the prefix cache cuts the input into blocks that
        key its tree, and a tuple's slices are tuples, with no list copied on the way."""
        if self._input_tokens is None:
            # Made straight from the parts unless the list exists: a sequence that waits in a
            # long queue should not hold its input twice.
            ids = self._input_ids
            self._input_tokens = (*self.prefix_ids, *self.prompt_ids) if ids is None \
                else tuple(ids)
        return self._input_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """Everything whose KV the sequence needs: prefix, prompt and output so far."""
        return self.input_ids + self.output_ids

    @property
    def all_tokens(self) -> tuple[int, ...]:
        """``all_token_ids`` as a tuple (:attr:`input_tokens` itself while there is no output)."""
        tokens = self.input_tokens
        return tokens + tuple(self.output_ids) if self.output_ids else tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.prompt_ids)

    def append_tokens(self, token_ids: list[int]) -> None:
        """Record newly sampled tokens, stamping the time of the first one."""
        if token_ids and self.first_token_wall is None:
            self.first_token_wall = time.perf_counter()
        self.output_ids.extend(token_ids)

    def fail(self, message: str, internal: bool = False) -> None:
        self.error = message
        self.internal_error = internal
        self.finish_reason = "error"
        self.status = SequenceStatus.FINISHED

    def to_completion(self) -> Completion:
        return Completion(
            request_id=self.request_id,
            agent_id=self.request.agent_id,
            text=self.text,
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=self.cached_tokens,
            output_tokens=len(self.output_ids),
            finish_reason=self.finish_reason or "error",
            submit_wall=self.submit_wall,
            first_token_wall=self.first_token_wall,
            finish_wall=time.perf_counter(),
            memory=self.memory,
            error=self.error,
            internal_error=self.internal_error,
        )


@dataclass
class Batch:
    """One iteration's work: the sequences and their ``chunk`` of tokens each.

    ``steps > 1`` is a *decode run* the scheduler chose: every sequence is decoding and the batch
    would repeat unchanged for ``steps`` iterations (nothing waits to join, none can stop
    early), so an executor that can (the modeled one) takes them at once; the scheduler has
    already reserved the KV blocks for all of them.
    """

    seqs: list[Sequence]
    steps: int = 1

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)
