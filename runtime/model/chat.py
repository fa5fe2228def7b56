"""Turning an agent's prefix, history and prompt into token ids with the model's chat template.

The prefix becomes the system turn, the history the turns that follow it (each in its own role)
and the prompt the last user turn, after which the template's generation prompt makes the model
answer as the assistant.

The conversation is rendered once per turn count (the first turn, the first two, ... all of
them) so that each turn's text is the part the template added for it, and every turn is
tokenized on its own: a BPE merge never crosses a turn boundary. The generation prompt is a
piece of its own too, and so is the same text at the start of an earlier assistant turn. Two
properties follow, for a template that renders a conversation as its turns one after the other
(ChatML, which SmolLM2 uses, Llama 3, ...):

* the prefix tokens are identical on every call of the same agent, so an engine can keep and
  reuse the prefix KV;
* the input of a request is a token-prefix of the input of the agent's next request, when that
  one's history is this one's history, this one's prompt as a user turn and the reply as an
  assistant turn: the turns are the same pieces, and the generation prompt that ended this
  request starts the rendered assistant turn. What follows it, the reply's own tokens, matches
  as far as tokenizing the reply's text gives back the tokens the model generated.

A template that does not render this way (one that rewrites earlier turns when more follow)
gets as many leading turns split off as render stably, and the rest of the input as one piece;
when even the system turn does not, there is no reusable prefix.

Encoding is safe from several threads at once: the caches are only looked up and filled, and
the tokenizer is called without changing its settings.

Rendering every turn count costs time quadratic in the length of a conversation, so the cut of
each conversation prefix seen before (keyed by a digest of its messages) and the token ids of
each turn text are kept: an agent's next request renders and tokenizes only its new turns.
"""

from __future__ import annotations

import hashlib
import json
from collections import abc
from typing import Any

from runtime.request import Turn


#: How many characters of turn texts a :class:`ChatFormat` keeps, cuts and token ids together.
_CACHED_CHARS = 1 << 24


class ChatFormat:
    """Chat-template encoding with stable token boundaries between turns."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        #: digest of a conversation's first ``n`` messages -> the text its ``n``-th turn adds
        self._cuts: dict[bytes, str] = {}
        #: a turn's text -> its token ids
        self._ids: dict[str, list[int]] = {}
        self._cached_chars = 0

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
            return text
        # Base models without a template: plain text turns.
        return "".join(f"{m['content']}\n\n" for m in messages)

    def _keep(self, chars: int) -> None:
        """Make room for ``chars`` more characters in the caches."""
        if self._cached_chars + chars > _CACHED_CHARS:
            self._cuts.clear()
            self._ids.clear()
            self._cached_chars = 0
        self._cached_chars += chars

    @staticmethod
    def _digests(messages: list[dict[str, Any]]) -> list[bytes]:
        """A digest of each conversation prefix: of the first message, the first two, ..."""
        digests, last = [], b""
        for message in messages:
            data = json.dumps(message, sort_keys=True, default=str).encode("utf-8", "surrogatepass")
            last = hashlib.blake2b(last + data, digest_size=16).digest()
            digests.append(last)
        return digests

    def _pieces(self, messages: list[dict[str, Any]]) -> tuple[list[str], int]:
        """The rendered input cut into the text each turn adds, and the number of turns cut
        off stably (the last piece holds the generation prompt, or the rest of the input)."""
        full = self._render(messages, True)
        digests = self._digests(messages)
        pieces: list[str] = []
        for digest in digests:  # the turns whose cut is known already
            known = self._cuts.get(digest)
            if known is None:
                break
            pieces.append(known)
        done = "".join(pieces)
        if not full.startswith(done):  # not so for a template that renders the same way twice
            pieces, done = [], ""
        for n in range(len(pieces) + 1, len(messages) + 1):
            try:
                text = self._render(messages[:n], False)
            except Exception:  # a template that refuses a partial conversation
                break
            if not (text.startswith(done) and full.startswith(text)):
                break
            piece = text[len(done):]
            self._keep(len(piece))
            self._cuts[digests[n - 1]] = piece
            pieces.append(piece)
            done = text
        stable = len(pieces)
        pieces.append(full[len(done):])
        return pieces, stable

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """The token ids of each text, the texts of earlier turns from the cache."""
        # Looked up once into a local dict: another thread encoding at the same time may
        # clear the caches between two lookups (the server tokenizes on worker threads).
        found: dict[str, list[int]] = {}
        new: list[str] = []
        for text in dict.fromkeys(texts):
            cached = self._ids.get(text)
            if cached is None:
                new.append(text)
            else:
                found[text] = cached
        if new:
            for text, ids in zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"]):
                self._keep(len(text))
                self._ids[text] = found[text] = list(ids)
        return [found[t] for t in texts]

    def encode(self, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        """Return ``(prefix_ids, prompt_ids)`` whose concatenation is the full model input.

        ``prefix_ids`` are the system turn's tokens (none when ``prefix`` is empty);
        ``prompt_ids`` are those of the ``history`` turns, the ``prompt``'s user turn and the
        generation prompt.
        """
        messages: list[dict[str, Any]] = []
        if prefix:
            messages.append({"role": "system", "content": prefix})
        for turn in history:
            content = turn.get("content")
            messages.append({**turn, "content": "" if content is None else content})
        messages.append({"role": "user", "content": prompt})
        pieces, stable = self._pieces(messages)
        if stable == len(messages):
            generation = pieces[-1]
            split: list[str] = []
            for message, piece in zip(messages, pieces):
                if message["role"] == "assistant" and generation and piece.startswith(generation):
                    split += [generation, piece[len(generation):]]
                else:
                    split.append(piece)
            pieces = split + [generation]
        tokens = self._tokenize([p for p in pieces if p])
        if prefix and stable > 0:
            return list(tokens[0]), [t for piece in tokens[1:] for t in piece]
        # No prefix, or a template that rewrites the system turn: no reusable prefix.
        return [], [t for piece in tokens for t in piece]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
