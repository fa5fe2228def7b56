"""From an OpenAI message list to the engine's (prefix, history, prompt), and tool calls back out.

The engine renders a request with the model's chat template as the agent's stable *prefix*
(the system turn, whose KV it keeps between the agent's calls), the *history* (the turns that
follow, each in its own role) and the *prompt* (the last user turn), after which the model
answers as the assistant. The conversation keeps its turns, so each request of an agent that
sends its growing conversation starts with the tokens of its previous request (see
:mod:`runtime.model.chat`), and the engine's prefix cache reuses them.

* The leading system / developer messages, plus the tool schemas when the request has any,
  become the prefix, so an agent that keeps its persona and tools keeps its prefix KV. The
  tools preamble comes first: clients that offer every agent the same tools (OASIS: about a
  thousand tokens of schemas) then send one shared token prefix before each agent's persona,
  which the prefix cache computes once for all of them.
* The last message is the prompt when it is a user message or a tool result; every message
  between the two is a history turn. A trailing assistant (or system) message, a prefill this
  server cannot continue, is a history turn too, and the prompt is then an empty user turn.
* A user message with a ``name`` (several speakers in one conversation) is the turn
  ``name: text``; an assistant message is its text alone, so the model's own turns look like
  the replies it writes.
* An assistant's earlier tool calls are written into its turn the way the tools preamble
  asks the model to write them (a ``<tool_call>`` block per call, holding
  ``{"name": ..., "arguments": ...}``) after its text: the SmolLM2 template renders a
  message's content only. A tool result is a user turn holding a ``<tool_response>`` block of
  ``{"name": ..., "content": ...}`` when the tool's name is known (from the message, or from
  the call its ``tool_call_id`` answers), else of the bare result. That is the Hermes
  convention of the preamble; Qwen2.5's own template also renders tool results as user turns
  in ``<tool_response>`` tags. SmolLM2's template would print a ``tool`` role as it is, a role
  the model was never trained on.

A client that rewrites its history (a summary in place of old turns, a trimmed window) is served
as well: its request shares tokens with the earlier ones up to the first turn that changed, and
the cache reuses that much.

Tools are described Hermes-style (schemas inside ``<tools>``, calls as
``<tool_call>{"name": ..., "arguments": ...}</tool_call>``); :func:`parse_tool_calls` takes
such calls out of a reply (and a reply that is nothing but the call object, which small models
write without the tags). A reply that is not a well-formed call of one of the request's tools
is plain content: tools never make a request fail. A forced call (``tool_choice`` ``required``
or a named function) is decoded under a grammar of exactly that format, so it always parses
unless ``max_tokens`` cuts it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Collection

from scalesim.serve.protocol import Message, ToolCall

_DECODER = json.JSONDecoder()
#: a reply that is one Markdown code block (```json ... ```)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query. The function signatures "
    "are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\nFor each function call, "
    "return a json object with the function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>")


def _call_text(call: ToolCall) -> str:
    args: Any = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # not JSON: kept as the string the client sent
    return ("<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": args})
            + "\n</tool_call>")


def _assistant_text(message: Message) -> str:
    parts = [message.text()] if message.text() else []
    parts += [_call_text(call) for call in message.tool_calls or ()]
    return "\n".join(parts)


def _tool_result_text(message: Message, names: dict[str, str]) -> str:
    name = message.name or names.get(message.tool_call_id or "")
    body = json.dumps({"name": name, "content": message.text()}) if name else message.text()
    return f"<tool_response>\n{body}\n</tool_response>"


def _turn(message: Message, names: dict[str, str]) -> dict[str, Any]:
    """One message as a chat turn of the engine's request (see the module docstring)."""
    if message.role == "assistant":
        return {"role": "assistant", "content": _assistant_text(message)}
    if message.role in ("tool", "function"):
        return {"role": "user", "content": _tool_result_text(message, names)}
    if message.role == "user":
        text = message.text()
        return {"role": "user", "content": f"{message.name}: {text}" if message.name else text}
    return {"role": "system", "content": message.text()}  # a system message mid-conversation


def render(messages: list[Message], tools: list[dict[str, Any]] | None = None
           ) -> tuple[str, tuple[dict[str, Any], ...], str]:
    """``(prefix, history, prompt)`` of a chat request (see the module docstring)."""
    head = 0
    while head < len(messages) and messages[head].role in ("system", "developer"):
        head += 1
    system = [m.text() for m in messages[:head]]
    if tools:  # first: agents offered the same tools share it, whatever their personas
        schemas = "\n".join(json.dumps(t, sort_keys=True) for t in tools)
        system.insert(0, TOOLS_PREAMBLE.format(tools=schemas))
    prefix = "\n\n".join(s for s in system if s)
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()
             if call.id}
    turns = [_turn(m, names) for m in messages[head:]]
    if turns and turns[-1]["role"] == "user":
        return prefix, tuple(turns[:-1]), str(turns[-1]["content"])
    return prefix, tuple(turns), ""


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """The function names of a request's ``tools``."""
    names = set()
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def _call(raw: str, names: Collection[str] | None) -> dict[str, Any] | None:
    """One call in OpenAI's shape from the JSON object at the start of ``raw`` (text after it is
    ignored), or None when it is not a call: no object, no string ``name`` (or one not among
    ``names``), arguments that are not an object."""
    try:
        data, _ = _DECODER.raw_decode(raw.strip())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("function"), dict):  # {"type": "function", "function": {...}}
        data = data["function"]
    name = data.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def parse_tool_calls(text: str, names: Collection[str] | None = None
                     ) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its content and its tool calls (OpenAI shape).

    A call is what the tools preamble asks for: a ``<tool_call>`` block holding
    ``{"name": ..., "arguments": {...}}`` (``parameters`` is read as ``arguments``; the closing
    tag may be missing when ``max_tokens`` cut the reply; text after the object is ignored).
    A reply with no such block is a call too when it is nothing but that object, bare or in a
    Markdown code fence (small models drop the tags). With ``names`` (the request's tools),
    a call of any other function is not a call. Returns ``(text, [])`` when the reply holds no
    call: it is plain content, never an error.
    """
    calls: list[dict[str, Any]] = []
    if "<tool_call>" in text:
        calls = [c for c in (_call(raw, names) for raw in _TOOL_CALL.findall(text)) if c]
        if calls:
            content = _TOOL_CALL.sub("", text).strip()
            return content or None, calls
        return text, []
    bare = _FENCE.fullmatch(text.strip())
    body = bare.group(1) if bare else text.strip()
    if body.startswith("{"):
        try:
            json.loads(body)  # the whole reply is the object, nothing after it
        except ValueError:
            return text, []
        call = _call(body, names)
        if call is not None:
            return None, [call]
    return text, []
