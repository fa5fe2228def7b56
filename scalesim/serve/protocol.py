"""The request bodies the server accepts, as pydantic models.

They follow the OpenAI API and are lenient where frameworks differ: unknown fields are ignored
(frameworks send ``reasoning_effort``, ``verbosity``, ``strict``, ``parallel_tool_calls``...),
message content may be a string or an array of content parts, messages may carry ``name``,
``tool_calls`` and ``tool_call_id``. What the server cannot honour is refused with a 400 naming
the field (``n > 1``, token-id prompts, ``logprobs``), never silently answered wrongly.

Structured output (:meth:`GenerationBody.constraint`): ``response_format`` ``json_object`` or
``json_schema``, ``tool_choice`` ``required`` or a named function (chat), and vLLM's
``guided_choice`` / ``guided_regex`` (sent with ``extra_body``) become one
:class:`~runtime.Constraint` of the request; an invalid schema or pattern is a 400 naming
its field, and so is asking for two constraints at once.

The optional ``scalesim`` object (sent with the client's ``extra_body``) names the agent and
carries invocation-distance hints; :class:`HintsBody` and :class:`UpdateBody` are the bodies of
the bulk hint endpoints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime import Constraint, ConstraintError
from runtime.constrained import checked
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
    #: vLLM's extra sampling field (``extra_body``): -1 or 0 for no top-k cut
    top_k: int | None = Field(default=None, ge=-1)
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
    #: vLLM's guided decoding fields (``extra_body``): the reply is one of these strings, or
    #: matches this regular expression
    guided_choice: list[str] | None = None
    guided_regex: str | None = None

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
        if kind not in (None, "text", "json_object", "json_schema"):
            return ("response_format", f"response_format: {kind!r} is not supported; use "
                    "'text', 'json_object' or 'json_schema'")
        return None

    def constraints(self) -> list[tuple[str, Constraint]]:
        """Every constraint the body asks for, with the field that asked (unchecked)."""
        found: list[tuple[str, Constraint]] = []
        rf = self.response_format
        kind = rf.get("type") if isinstance(rf, dict) else rf
        if kind == "json_object":
            found.append(("response_format", Constraint.json_object()))
        elif kind == "json_schema":
            spec = rf.get("json_schema") if isinstance(rf, dict) else None
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema", "response_format.json_schema: "
                                  "needs a 'schema' object (the JSON schema of the reply)")
            found.append(("response_format.json_schema", Constraint.json_schema(schema)))
        if self.guided_choice is not None:
            found.append(("guided_choice", Constraint.choice(self.guided_choice)))
        if self.guided_regex is not None:
            found.append(("guided_regex", Constraint.regex(self.guided_regex)))
        return found

    def constraint(self) -> tuple[str, Constraint] | None:
        """The one constraint of the reply and the field that asks for it, checked (a 400
        naming the field when it cannot be built, or when two fields ask for one), or None."""
        found = self.constraints()
        if len(found) > 1:
            raise bad_request(found[1][0], f"{found[1][0]}: only one constraint per request; "
                              f"{found[0][0]} asks for one already")
        if not found:
            return None
        field, constraint = found[0]
        try:
            constraint.grammar()
        except ConstraintError as exc:
            raise bad_request(field, f"{field}: {exc}") from None
        return field, constraint

    def question(self) -> str:
        """The text a choice prompt is looked for in (``serve.choice_prompts``)."""
        raise NotImplementedError

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class ChatCompletionBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def forced_tool(self) -> bool:
        """Whether ``tool_choice`` forces a tool call (``required`` or a named function)."""
        return self.tool_choice not in (None, "auto", "none")

    def constraints(self) -> list[tuple[str, Constraint]]:
        """As for every generation, and a forced tool call: one call of one of the request's
        tools (``required``) or of the named one, its arguments an instance of its schema."""
        found = super().constraints()
        if not self.forced_tool():
            return found
        choice = self.tool_choice
        if not self.tools:
            raise bad_request("tool_choice", f"tool_choice: {choice!r} needs tools")
        if choice == "required":
            name = None
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
                and isinstance(choice["function"].get("name"), str):
            name = choice["function"]["name"]
        else:
            raise bad_request("tool_choice", f"tool_choice: {choice!r} is none of 'none', "
                              "'auto', 'required' or {'type': 'function', 'function': "
                              "{'name': ...}}")
        try:
            return [("tool_choice", Constraint.tool_call(self.tools, name))] + found
        except ConstraintError as exc:
            raise bad_request("tool_choice", f"tool_choice: {exc}") from None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def question(self) -> str:
        """The last user message's text ("" when there is none)."""
        users = [m for m in self.messages if m.role == "user"]
        return users[-1].text() if users else ""

    def answers_tool_result(self) -> bool:
        """Whether the conversation ends with a tool result (the client passes results back
        and waits for the model's answer to them)."""
        return self.messages[-1].role in ("tool", "function")


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

    def question(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt[:1])


def prompt_choices(text: str, patterns: Sequence[re.Pattern[str]]) -> list[str] | None:
    """The options a prompt asks the reply to be one of, by the first of ``patterns`` (each
    with a group ``options``) found in ``text``: the group's non-empty lines, stripped, each
    once; None when no pattern matches (or its options are empty).

    This is ``serve.choice_prompts``: some clients ask for an exact option in the prompt alone
    ("respond with exactly one of: ...") and resample until the reply is one; the operator
    names the phrase, and the reply is constrained as ``guided_choice`` would constrain it.
    """
    for pattern in patterns:
        found = pattern.search(text)
        if found is None or found.group("options") is None:
            continue
        options = list(dict.fromkeys(
            line.strip() for line in found.group("options").splitlines() if line.strip()))
        if options:
            return options
    return None


def server_constraint(body: GenerationBody, tool_choice_auto: str,
                      choice_prompts: Sequence[re.Pattern[str]]) -> tuple[str, Constraint] | None:
    """The constraint the server's settings put on a request that asked for none, and the
    setting that put it: a tool call (``serve.tool_choice_auto: required``, for a chat request
    with tools and ``tool_choice`` "auto" or none whose last message is no tool result), or one
    of the options its prompt lists (``serve.choice_prompts``, for a request without tools).
    A request is never refused for a constraint it did not ask for: tools whose schemas make no
    grammar leave it free text, as ``auto`` would."""
    if isinstance(body, ChatCompletionBody) and body.tools:
        if (tool_choice_auto == "required" and body.tool_choice in (None, "auto")
                and not body.answers_tool_result()):
            try:
                return "serve.tool_choice_auto", checked(Constraint.tool_call(body.tools, None))
            except ConstraintError:  # the client asked for no constraint: it gets free text
                return None
        return None
    options = prompt_choices(body.question(), choice_prompts)
    return None if options is None else ("serve.choice_prompts",
                                         checked(Constraint.choice(options)))


#: the most inputs one embeddings request may carry (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingBody(_Lenient):
    """``POST /v1/embeddings``: one text, or a list of texts or of token-id lists."""

    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    #: shortened embeddings are not offered (a request asking for them is refused)
    dimensions: int | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list (a 400 naming ``input`` for an empty one or too many)."""
        raw = self.input
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif raw and all(isinstance(t, int) for t in raw):  # one token-id list
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise bad_request("input", "input: at least one input is needed")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise bad_request("input", f"input: at most {MAX_EMBEDDING_INPUTS} inputs per "
                              f"request, got {len(items)}")
        for i, item in enumerate(items):
            if not item:
                param = "input" if len(items) == 1 else f"input.{i}"
                raise bad_request(param, f"{param}: an empty input has nothing to embed")
        return items


class HintsBody(_Lenient):
    """``POST /v1/scalesim/hints``: a session's estimates for many agents at once."""

    session: str = "default"
    clock: float
    seq: int
    hints: list[AgentHint] = Field(default_factory=list)


class UpdateBody(_Lenient):
    """The seed paper's ``POST /v1/update``: integer distances relative to now, per agent."""

    distances: dict[str, int] = Field(default_factory=dict)
