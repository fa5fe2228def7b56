"""Reading the LLM's reply robustly: pick one option out of free text, or say that none fits.

A small model rarely answers in exactly the requested format. :func:`pick` finds the option the
reply names first (case-insensitive, whole words, so ``"Left."`` and ``"I'd go LEFT"`` both give
``"left"``) and returns ``None`` when the reply names none; the caller then falls back to a
default and counts the fallback (see :meth:`agents.LLMAgent.choose`). :func:`first_line` trims a
free-text reply to the sentence a world stores.
"""

from __future__ import annotations

import re
from typing import Sequence


def pick(text: str, options: Sequence[str]) -> str | None:
    """The option that appears earliest in ``text`` as whole words, or ``None``.

    At equal positions the longer option wins ("town hall" over "town").
    """
    lowered = text.lower()
    best: tuple[int, int, str] | None = None
    for option in options:
        match = re.search(rf"(?<![\w]){re.escape(option.lower())}(?![\w])", lowered)
        if match is not None:
            key = (match.start(), -len(option), option)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def first_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of ``text``, stripped of quotes and capped at ``limit`` chars."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line[:limit]
    return ""
