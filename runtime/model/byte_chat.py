"""Text as bytes, for a model with random weights and no tokenizer.

A built-in profile (:data:`runtime.model.profiles.PROFILES`) with random weights has the shape of
a real model and no vocabulary. :class:`ByteChat` lets it serve text anyway, so that worlds, the
server and the benchmarks run on any profile and device — a 7B shape on a GPU, say — with no
model files: each UTF-8 byte of a turn is one token, and each turn opens with a marker token of
its role and closes with an end-of-turn marker, as a chat template would frame it. The output of
random weights is noise; decoding makes it printable text of one character per generated token,
so replies that an agent keeps in its history grow its prompts by as many tokens as were
generated.

The layout keeps the properties the engine relies on (:class:`~runtime.executors.base.ChatCodec`):
the system turn's ids are a token-prefix of the input, and a request's input is a token-prefix of
the next one's when that one's history adds this request's prompt and reply (up to the reply's
own ids, which are re-encoded from its text).
"""

from __future__ import annotations

from collections import abc

from runtime.request import Turn

#: the roles with a marker of their own; any other role takes the ``user`` marker
ROLES = ("system", "user", "assistant", "tool")


class ByteChat:
    """UTF-8 bytes as token ids ``base .. base + 255``, role and end-of-turn markers above them.

    ``base`` is chosen above the model's end-of-sequence ids where they are small (SmolLM2's is
    2), and every id used must lie inside ``vocab_size`` and avoid ``eos_token_ids`` (else a
    ``ValueError`` names the clash).
    """

    def __init__(self, vocab_size: int, eos_token_ids: abc.Iterable[int] = (),
                 base: int = 256) -> None:
        self.base = base
        self.markers = {role: base + 256 + i for i, role in enumerate(ROLES)}
        self.end = base + 256 + len(ROLES)
        used = range(base, self.end + 1)
        if self.end >= vocab_size:
            raise ValueError(f"a vocabulary of {vocab_size} ids cannot hold the byte codec's "
                             f"ids {used.start}..{used.stop - 1}")
        clash = sorted(set(eos_token_ids) & set(used))
        if clash:
            raise ValueError(f"end-of-sequence ids {clash} fall inside the byte codec's ids "
                             f"{used.start}..{used.stop - 1}; pick another base")

    def _turn(self, role: str, text: str) -> list[int]:
        marker = self.markers.get(role, self.markers["user"])
        return [marker, *(self.base + b for b in text.encode("utf-8", "surrogatepass")), self.end]

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """``(prefix_ids, prompt_ids)``: the system turn, then the history turns, the prompt's
        user turn and the assistant's opening marker (the generation prompt)."""
        prefix_ids = self._turn("system", prefix) if prefix else []
        prompt_ids: list[int] = []
        for turn in history:
            content = turn.get("content")
            prompt_ids += self._turn(str(turn.get("role", "user")),
                                     "" if content is None else str(content))
        prompt_ids += self._turn("user", prompt)
        prompt_ids.append(self.markers["assistant"])
        return prefix_ids, prompt_ids

    def decode(self, token_ids: list[int]) -> str:
        """Byte ids as their bytes; every other id as one printable ASCII character."""
        out = bytearray()
        for t in token_ids:
            if self.base <= t < self.base + 256:
                out.append(t - self.base)
            else:
                out.append(32 + t % 95)
        return out.decode("utf-8", "replace")
