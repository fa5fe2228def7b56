"""The request bodies the server accepts, as pydantic models.

They follow the OpenAI API and are lenient where frameworks differ: unknown fields are ignored
(frameworks send ``reasoning_effort``, ``verbosity``, ``strict``, ``parallel_tool_calls``...),
message content may be a string or an array of content parts, messages may carry ``name``,
``tool_calls`` and ``tool_call_id``. What the server cannot honour is refused with a 400 naming
the field (``n > 1``, token-id prompts), never silently answered wrongly.

The optional ``scalesim`` object (sent with the client's ``extra_body``) names the agent and
carries invocation-distance hints; :class:`HintsBody` and :class:`UpdateBody` are the bodies of
the bulk hint endpoints.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scalesim.serve.errors import bad_request

#: An eta: a time on the session's clock, ``None`` (drop the hint) or ``"never"`` (done).
Eta = Union[float, Literal["never"], None]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str = "text"
    text: str | None = None


class ToolCallFunction(_Lenient):
    name: str = ""
    arguments: str | dict[str, Any] = ""


class ToolCall(_Lenient):
    id: str | None = None
    type: str = "function"
    function: ToolCallFunction = Field(default_factory=ToolCallFunction)


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text stand as ``[type]``."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if p.text is not None else f"[{p.type}]" for p in self.content)


class AgentHint(_Lenient):
    """When one agent is expected to call next, on the session's clock."""

    agent: str = Field(min_length=1)
    eta: Eta = None


class ScaleSimFields(_Lenient):
    """The optional ``scalesim`` object of a request."""

    agent: str | None = Field(default=None, min_length=1)
    session: str = "default"
    clock: float | None = None
    #: when this agent calls again after this call (absolute, on the session's clock)
    next_eta: Eta = None
    kind: Literal["exact", "deadline", "estimate"] = "estimate"
    hints: list[AgentHint] = Field(default_factory=list)


class StreamOptions(_Lenient):
    include_usage: bool = False


class GenerationBody(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    scalesim: ScaleSimFields | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None

    @field_validator("scalesim", mode="before")
    @classmethod
    def _best_effort(cls, value: Any) -> Any:
        """Hints never fail a request: a malformed ``scalesim`` object keeps what is valid."""
        if value is None or isinstance(value, ScaleSimFields):
            return value
        try:
            return ScaleSimFields.model_validate(value)
        except ValidationError:
            pass
        if not isinstance(value, dict):
            return None
        kept: dict[str, Any] = {}
        for key in ("agent", "session"):
            if isinstance(value.get(key), str) and value[key]:
                kept[key] = value[key]
        return ScaleSimFields.model_validate(kept)

    def unsupported(self) -> tuple[str, str] | None:
        """``(field, why)`` of the first thing asked for that the server cannot honour (it is
        refused rather than ignored), or None."""
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            field = "logprobs" if self.logprobs not in (None, False, 0) else "top_logprobs"
            return field, f"{field}: log-probabilities are not returned by this server"
        kind = self.response_format.get("type") if isinstance(self.response_format, dict) \
            else self.response_format
        if kind not in (None, "text"):
            return ("response_format", f"response_format: {kind!r} is not supported (no "
                    "structured output yet); only 'text'")
        return None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class ChatCompletionBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        """As for every generation, and: a tool call cannot be forced (``required`` or a named
        function); ``auto`` and ``none`` are honoured as the model replies."""
        found = super().unsupported()
        if found is None and self.tool_choice not in (None, "auto", "none"):
            found = ("tool_choice", f"tool_choice: {self.tool_choice!r} cannot be honoured (no "
                     "constrained decoding yet); use 'auto' or 'none'")
        return found

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(GenerationBody):
    prompt: str | list[str]
    suffix: str | None = None

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        """The one prompt of the request (a one-element list is accepted)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request("prompt", f"prompt: exactly one prompt per request is served, "
                              f"got {len(self.prompt)}")
        return self.prompt[0]


class HintsBody(_Lenient):
    """``POST /v1/scalesim/hints``: a session's estimates for many agents at once."""

    session: str = "default"
    clock: float
    seq: int
    hints: list[AgentHint] = Field(default_factory=list)


class UpdateBody(_Lenient):
    """The seed paper's ``POST /v1/update``: integer distances relative to now, per agent."""

    distances: dict[str, int] = Field(default_factory=dict)
