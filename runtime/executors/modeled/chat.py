"""What the modeled executor says in place of a model: token ids and placeholder replies.

:class:`LengthChat` sizes prompts by their length (about four characters per token), gives each
chunk of characters a token id of its own, and answers every call with one of a few placeholder
replies, so a world's branches follow a fixed mix. :class:`ReplayChat` tokenizes with the real
chat template and answers every call as a recorded run did, so a modeled replay of a real run
makes the same calls.
"""

from __future__ import annotations

import array
import hashlib
import math
import re
import sys
from collections import abc
from typing import Any

import numpy as np

from runtime.request import Request, RequestError, Turn


#: Output token ids start here: above every vocabulary, so a filler is never an end-of-sequence id.
FILLER = 1 << 24

#: At most this many chunk ids are kept for texts seen before (personas, turns, prompts).
_CACHED_IDS = 1 << 20
#: At most this many texts are remembered as seen once (a text is kept when seen again).
_SEEN_TEXTS = 1 << 16
#: An odd 64-bit multiplier (the golden ratio's), to spread the ids of a fixed-length persona.
_MULTIPLIER = 0x9E3779B97F4A7C15
#: Ids of a fixed-length persona hashed from its text (the rest depend on the position alone).
SEEDED_IDS = 64


def _digest_id(data: bytes, person: bytes) -> int:
    """A signed 64-bit id hashed from ``data`` (BLAKE2b, the same in every process)."""
    digest = hashlib.blake2b(data, digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little", signed=True)


class LengthChat:
    """Tokenization by length: ``template_tokens + ceil(chars / chars_per_token)`` ids per turn.

    A turn's ids are one id per chunk of ``chars_per_token`` characters of its text (the last
    chunk may be shorter), then ``template_tokens`` markers of its role (fixed ids standing for
    the chat template's ``<|im_end|>`` and the next ``<|im_start|>role``; they close the turn,
    so requests whose texts differ from their first character share no id). ``history`` turns
    come between the system turn (the prefix) and the prompt's user turn, each sized and id'd
    the same way, so an agent whose next request repeats this one's turns and adds its reply
    finds all of this request's ids at the start of the next one. (The reply's own ids are
    filler, below, not those of its text.)

    A chunk's id depends on its characters alone and is the same in every process (not
    Python's salted ``hash``): equal text prefixes give equal token-id prefixes, and texts part
    where their chunks do. With four characters per token (the default) the id *is* the chunk:
    its four UTF-16 code units read as one signed little-endian 64-bit number (the last chunk
    padded with zeros), so distinct chunks never share an id. A chunk holding a character
    outside the Basic Multilingual Plane (an emoji), and every chunk when ``chars_per_token`` is
    another value (chunks cut at ``floor(k * chars_per_token)``), gets a 64-bit BLAKE2b hash
    instead, computed chunk by chunk, slower. The ids are not the model's vocabulary
    (``vocab_size`` is unused): ids drawn from a vocabulary-sized range would collide between
    the personas of 100,000 agents, and a prefix cache would then share KV between them. Texts
    seen before (personas, earlier turns, recurring prompts) are looked up, not cut again.

    ``prefix_tokens`` fixes the prefix length instead (to model long personas): the system
    turn's first :data:`SEEDED_IDS` ids are then hashed from the whole text and their position,
    the rest are ids of their position alone, shared by every persona, then its markers. The
    first block of a persona tells it apart, and a prefix cache keys each block by everything
    before it, so only equal personas share cached blocks; making 1,000 ids per agent from one
    list slice rather than hashing each keeps a world of a million agents quick to declare. Output is placeholder text: the executor emits filler token
    ``FILLER + i`` for a call and :meth:`decode` turns it into ``replies[i]``, so a world can be
    fed a deterministic mix of answers (``("post", "reply", "nothing")``) to keep its branches
    busy.
    """

    def __init__(self, chars_per_token: float = 4.0, prefix_tokens: int | None = None,
                 template_tokens: int = 5, vocab_size: int = 32000,
                 replies: abc.Sequence[str] | abc.Mapping[str, abc.Sequence[str]] = ("ok",)
                 ) -> None:
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be > 0, got {chars_per_token}")
        self.chars_per_token = chars_per_token
        self.prefix_tokens = prefix_tokens
        self.template_tokens = template_tokens
        self.vocab_size = vocab_size
        if not replies:
            raise ValueError("replies must name at least one placeholder answer")
        #: (pattern, first reply, reply count) per pattern, in order; empty: one cycled list
        self._patterns: list[tuple[re.Pattern[str], int, int]] = []
        if isinstance(replies, abc.Mapping):
            flat: list[str] = []
            for pattern, answers in replies.items():
                if isinstance(answers, str) or not answers:
                    raise ValueError(f"replies for {pattern!r} must be a non-empty list")
                try:
                    self._patterns.append((re.compile(pattern), len(flat), len(answers)))
                except re.error as exc:
                    raise ValueError(f"replies pattern {pattern!r}: {exc}") from None
                flat += answers
            self.replies = tuple(flat)
        else:
            self.replies = tuple(replies)
        self._markers: dict[str, list[int]] = {}
        self._cache: dict[str, list[int]] = {}
        self._seen: set[int] = set()
        self._fixed: dict[str, list[int]] = {}
        self._cached_ids = 0
        self._positions = np.zeros(0, dtype=np.uint64)
        self._shared: list[int] = []

    def count(self, text: str) -> int:
        return self.template_tokens + math.ceil(len(text) / self.chars_per_token)

    # -- ids -------------------------------------------------------------------------------------

    def _word_ids(self, text: str) -> list[int]:
        """Four characters per id: each chunk's UTF-16 code units as one 64-bit word."""
        data = text.encode("utf-16-le", "surrogatepass")
        if len(data) != 2 * len(text):  # astral characters took two code units each
            return [self._chunk_id(text[k:k + 4]) for k in range(0, len(text), 4)]
        words = array.array("q", data + bytes(-len(data) % 8))
        if sys.byteorder == "big":
            words.byteswap()
        return words.tolist()

    def _chunk_id(self, chunk: str) -> int:
        """One chunk's id, one chunk at a time (the slow path)."""
        data = chunk.encode("utf-16-le", "surrogatepass")
        if self.chars_per_token == 4.0 and len(data) == 2 * len(chunk):
            return int.from_bytes(data + bytes(8 - len(data)), "little", signed=True)
        return _digest_id(chunk.encode("utf-8", "surrogatepass"), b"chunk")

    def _text_ids(self, text: str) -> list[int]:
        """The chunk ids of ``text``, ``ceil(len / chars_per_token)`` of them: cached from the
        second time a text is seen (a one-off prompt would only push others out)."""
        ids = self._cache.get(text)
        if ids is None:
            if self.chars_per_token == 4.0:
                ids = self._word_ids(text)
            else:
                per = self.chars_per_token
                bounds = [math.floor(k * per) for k in range(math.ceil(len(text) / per))]
                ids = [self._chunk_id(text[a:b]) for a, b in zip(bounds, bounds[1:] + [len(text)])]
            key = hash(text)  # within this process only: it decides caching, never an id
            if key in self._seen:
                self._keep(self._cache, text, ids)
            else:
                if len(self._seen) >= _SEEN_TEXTS:
                    self._seen.clear()
                self._seen.add(key)
        return ids

    def _keep(self, cache: dict[str, list[int]], text: str, ids: list[int],
              counts_for: int | None = None) -> None:
        """Cache ``ids`` for ``text``, counted as ``counts_for`` ids (default: their number)."""
        count = len(ids) if counts_for is None else counts_for
        if self._cached_ids + count > _CACHED_IDS:
            self._cache.clear()
            self._fixed.clear()
            self._cached_ids = 0
        cache[text] = ids
        self._cached_ids += count

    def _fixed_prefix_ids(self, prefix: str, length: int) -> list[int]:
        """``length`` ids for a system turn (see the class doc), then its markers: a new list.

        Only the ids hashed from the text are cached: a world of 150,000 personas fills the
        cache with whole lists of 1,000 ids a thousand at a time and misses nearly every call,
        while the rest of the list is a slice of the shared ids, as quick to make as a copy."""
        body = max(0, length - self.template_tokens)
        if body > len(self._positions):
            self._positions = np.arange(max(body, 2 * len(self._positions)),
                                        dtype=np.uint64) * np.uint64(_MULTIPLIER)
            self._shared = (self._positions * np.uint64(_MULTIPLIER)).view(np.int64).tolist()
        seeded = min(body, SEEDED_IDS)
        hashed_ids = self._fixed.get(prefix)
        if hashed_ids is None:
            seed = _digest_id(prefix.encode("utf-8", "surrogatepass"), b"persona") % (1 << 64)
            hashed = self._positions[:seeded] ^ np.uint64(seed)
            hashed *= np.uint64(_MULTIPLIER)  # wraps modulo 2**64
            hashed_ids = hashed.view(np.int64).tolist()
            # Counted as the whole list: as many personas are kept as when whole lists were,
            # and a world's declared personas do not fill the memory with their hashed ids.
            self._keep(self._fixed, prefix, hashed_ids, counts_for=max(length, 1))
        ids = hashed_ids + self._shared[seeded:body]
        ids += self._marker_ids("system")
        if len(ids) > length:  # fewer ids than markers: the last ``length`` markers
            ids = ids[-length:] if length else []
        return ids

    def _marker_ids(self, role: str) -> list[int]:
        ids = self._markers.get(role)
        if ids is None:
            ids = self._markers[role] = [
                _digest_id(f"{role}\n{i}".encode("utf-8", "surrogatepass"), b"role marker")
                for i in range(self.template_tokens)]
        return ids

    def _turn(self, role: str, text: str) -> list[int]:
        return self._text_ids(text) + self._marker_ids(role)

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)``: the system turn, then the history turns and the
        prompt's user turn, each its text's chunk ids and its role's markers."""
        if history:
            prompt_ids: list[int] = []
            for turn in history:
                content = turn.get("content")
                prompt_ids += self._turn(str(turn.get("role", "user")), content
                                         if isinstance(content, str) else str(content or ""))
            prompt_ids += self._turn("user", prompt)
        else:
            prompt_ids = self._turn("user", prompt)
        if not prefix:
            return [], prompt_ids
        if self.prefix_tokens is None:
            return self._turn("system", prefix), prompt_ids
        return self._fixed_prefix_ids(prefix, self.prefix_tokens), prompt_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.replies[(token_ids[0] - FILLER) % len(self.replies)] if token_ids else ""

    def reply(self, request: Request) -> tuple[int, int | None, bool]:
        """Which placeholder answers a call, its length (``None``: the executor's default) and
        whether its last token is end-of-sequence. With replies per pattern, the first pattern
        found in the prompt (a regular expression) chooses the list, the last list answering
        a prompt no pattern matches; the request id cycles through the list."""
        for pattern, first, count in self._patterns:
            if pattern.search(request.prompt):
                return first + request.request_id % count, None, True
        if self._patterns:
            _, first, count = self._patterns[-1]
            return first + request.request_id % count, None, True
        return request.request_id % len(self.replies), None, True


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

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        return self.chat.encode(prefix, prompt, history)

    def decode(self, token_ids: list[int]) -> str:
        return self.replies[token_ids[0] - FILLER] if token_ids else ""

    def reply(self, request: Request) -> tuple[int, int | None, bool]:
        queue = self._next.get(request.agent_id)
        if not queue:
            raise RequestError(f"request {request.request_id}: agent {request.agent_id!r} makes "
                               "more calls than it made in the recorded run (the world did not "
                               "replay identically)")
        return queue.pop()
