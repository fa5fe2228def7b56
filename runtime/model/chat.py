"""Turning an agent's prefix and prompt into token ids with the model's chat template.

The prefix becomes the system turn and the prompt the user turn. The two are tokenized separately
and concatenated, so the prefix tokens are identical on every call of the same agent: that is what
lets an engine keep and reuse the prefix KV.
"""

from __future__ import annotations

from typing import Any


class ChatFormat:
    """Chat-template encoding with a stable token boundary after the system turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
        # Base models without a template: plain text turns.
        text = "".join(f"{m['content']}\n\n" for m in messages)
        return text

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prefix: str, prompt: str) -> tuple[list[int], list[int]]:
        """Return ``(prefix_ids, prompt_ids)`` whose concatenation is the full model input."""
        user = [{"role": "user", "content": prompt}]
        if not prefix:
            return [], self._ids(self._render(user, True))
        system = [{"role": "system", "content": prefix}]
        head = self._render(system, False)
        full = self._render(system + user, True)
        if not full.startswith(head):
            # A template that rewrites the system turn when a user turn follows: no reusable prefix.
            return [], self._ids(full)
        return self._ids(head), self._ids(full[len(head):])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
