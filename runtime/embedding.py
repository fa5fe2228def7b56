"""Embeddings from the served generative model: its last hidden state, pooled.

A chat model is not a trained embedding model, and its embeddings say so wherever they are
served. What it gives: the hidden states after the final norm of every token of the input (no
chat template, no special tokens added), **averaged over the tokens and L2-normalised**. The
mean uses every token, so the vector does not hinge on the last one, as last-token pooling of a
causal model does; normalising makes the dot product the cosine similarity that clients compare.
Adapters play no part: an embedding is the base model's.

An :class:`EmbeddingPass` is one input's computation, cut into chunks of at most
``chunk_tokens`` tokens: :meth:`EmbeddingPass.step` runs one chunk, whose tokens attend to the
keys and values of the chunks before (kept by the pass, not in the engine's KV pool). Whoever
drives the engine runs one chunk between two engine iterations, so a long input delays the
running batch by one forward of at most a batch's tokens at a time, never by the whole input.
Making a pass (tokenizing) is safe on any thread; stepping it belongs to the engine's thread.
"""

from __future__ import annotations

from typing import Any

import torch

from runtime.request import RequestError


class EmbeddingPass:
    """One input's pooled embedding, computed a chunk at a time (see the module docstring)."""

    def __init__(self, model: Any, token_ids: list[int], chunk_tokens: int) -> None:
        self.model = model
        self.token_ids = token_ids
        self.chunk_tokens = max(1, chunk_tokens)
        self._done = 0
        self._past: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sum: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self._done >= len(self.token_ids)

    def step(self) -> bool:
        """Compute the next chunk; whether the pass is finished."""
        if self.finished:
            return True
        start, end = self._done, min(self._done + self.chunk_tokens, len(self.token_ids))
        ids = torch.tensor(self.token_ids[start:end], device=self.model.device)
        hidden = self.model.hidden_states(ids, start, self._past)
        total = hidden.sum(dim=0)
        self._sum = total if self._sum is None else self._sum + total
        self._done = end
        if self.finished:
            self._past = []  # the keys and values of a long input are large: free them now
        return self.finished

    def vector(self) -> list[float]:
        """The embedding: mean over the tokens, L2-normalised (after the last :meth:`step`)."""
        if not self.finished or self._sum is None:
            raise RuntimeError("the embedding pass has not finished")
        mean = self._sum / len(self.token_ids)
        return torch.nn.functional.normalize(mean, dim=0).tolist()


def check_ids(token_ids: list[int], vocab_size: int, max_tokens: int) -> list[int]:
    """``token_ids`` if they can be embedded, else a :class:`RequestError` saying why."""
    if not token_ids:
        raise RequestError("an input to embed has no tokens")
    if len(token_ids) > max_tokens:
        raise RequestError(f"an input to embed has {len(token_ids)} tokens; the model context "
                           f"is {max_tokens}")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary (0 .. {vocab_size - 1})")
    return token_ids
