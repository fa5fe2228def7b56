"""What the modeled executor says in place of a model: token counts and placeholder replies.

:class:`LengthChat` sizes prompts by their length (about four characters per token) and answers
every call with one of a few placeholder replies, so a world's branches follow a fixed mix.
:class:`ReplayChat` tokenizes with the real chat template and answers every call as a recorded
run did, so a modeled replay of a real run makes the same calls.
"""

from __future__ import annotations

import math
from typing import Any

from runtime.request import RequestError


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
