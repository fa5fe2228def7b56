"""The executor protocol: what the engine, the scheduler and the admission ask of a backend.

An executor advances a :class:`~runtime.sequence.Batch` of sequences. It owns the model (or the
cost model standing in for one) and says, per request, what memory objects it needs; the engine
owns submission, admission and finishing, the scheduler owns which sequences run. Three
implement it: ``torch`` (the real paged engine), ``hf`` (transformers ``generate``, the
baseline) and ``modeled`` (a cost model, no tensors).
"""

from __future__ import annotations

from collections import abc
from typing import Any, Protocol

from runtime.interface import EngineClock
from runtime.memory import AgentMemory
from runtime.model.profiles import ModelConfig
from runtime.request import Turn
from runtime.sequence import Batch, Sequence


class ChatCodec(Protocol):
    """Turns a request's prefix, history and prompt into token ids, and output ids into text."""

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)``: the system turn's ids, then those of the ``history``
        turns and of the prompt's user turn (with the assistant's generation prompt). The prefix
        ids are a token-prefix of the whole input, and (as far as the chat template allows) a
        request's input is a token-prefix of that of a next request whose history adds the
        request's own prompt and the turns that followed it."""

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated ``token_ids``."""


class Executor(Protocol):
    """A backend of the :class:`~runtime.engine.Engine` (see the module docstring)."""

    @property
    def chat(self) -> ChatCodec: ...

    @property
    def eos_token_ids(self) -> set[int]: ...

    @property
    def max_context(self) -> int:
        """Prompt plus output tokens one request may have at most."""

    @property
    def max_num_seqs(self) -> int:
        """Sequences that may run at once."""

    @property
    def engine_clock(self) -> EngineClock:
        """The engine's time: a :class:`~runtime.interface.WallClock`, or the modeled clock."""

    @property
    def architecture(self) -> ModelConfig | None:
        """The model's shapes, where the executor knows them."""

    def validate(self, seq: Sequence) -> None:
        """Raise :class:`~runtime.request.RequestError` if ``seq`` can never run here.

        An executor whose ``structured_output`` attribute is true (optional; absent means
        false) honours a request's :class:`~runtime.constrained.Constraint`: it checks it here
        and masks the request's logits by it when sampling. The engine refuses a *required*
        constraint on any other executor and leaves an optional one to it to ignore.
        """

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        """The agent memory objects ``seq`` needs resident while it runs (asked once)."""

    def decode_horizon(self, seq: Sequence) -> int:
        """How many more tokens ``seq`` surely decodes before the engine must look (>= 1)."""

    def execute(self, batch: Batch) -> None:
        """Compute each sequence's ``chunk``; append sampled tokens (or fail sequences)."""

    def report(self) -> dict[str, Any]:
        """Sections for the run's ``summary.json`` (``{}`` when there is nothing to say)."""
