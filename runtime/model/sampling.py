"""Choosing the next token of each sequence from its logits.

Greedy rows are one batched ``argmax``. Sampled rows apply temperature, top-k and top-p (nucleus)
filtering and draw from their own ``torch.Generator`` when the request has a seed, so a seeded
request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from runtime.request import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits of one row with top-k / top-p exclusions set to ``-inf``."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits [rows, vocab]``."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = torch.softmax(filter_logits(logits[row], p), dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
