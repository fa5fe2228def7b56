"""From an OpenAI message list to the engine's (prefix, prompt), and tool calls back out.

The engine renders a request as two chat turns: the agent's stable *prefix* (the system turn,
whose KV it keeps between the agent's calls) and the *prompt* (the user turn). The leading
system / developer messages, plus the tool schemas when the request has any, become the
prefix, so an agent that keeps its persona and tools keeps its prefix KV. The rest of the
conversation becomes the prompt: one user message as it is, a longer history as one speaker
line per message (``name`` or role, tool results and the assistant's earlier tool calls
included), ending with ``assistant:`` so the model answers as the assistant.

Tools are described Hermes-style (schemas inside ``<tools>``, calls as
``<tool_call>{"name": ..., "arguments": ...}</tool_call>``); :func:`parse_tool_calls` takes
such calls out of a reply. A reply that is not a well-formed call is plain content: tools
never make a request fail.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from scalesim.serve.protocol import Message

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query. The function signatures "
    "are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\nFor each function call, "
    "return a json object with the function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>")


def _speaker(message: Message) -> str:
    if message.role == "tool":
        return f"tool ({message.name or message.tool_call_id or 'result'})"
    return message.name or message.role


def _line(message: Message) -> str:
    text = message.text()
    for call in message.tool_calls or ():
        args = call.function.arguments
        args_json = args if isinstance(args, str) else json.dumps(args)
        text += (f"\n<tool_call>{{\"name\": {json.dumps(call.function.name)}, "
                 f"\"arguments\": {args_json}}}</tool_call>")
    return f"{_speaker(message)}: {text.strip()}"


def render(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """``(prefix, prompt)`` of a chat request (see the module docstring)."""
    head = 0
    while head < len(messages) and messages[head].role in ("system", "developer"):
        head += 1
    system = [m.text() for m in messages[:head]]
    if tools:
        schemas = "\n".join(json.dumps(t, sort_keys=True) for t in tools)
        system.append(TOOLS_PREAMBLE.format(tools=schemas))
    prefix = "\n\n".join(s for s in system if s)
    rest = messages[head:]
    if len(rest) == 1 and rest[0].role == "user" and not rest[0].name:
        return prefix, rest[0].text()
    lines = [_line(m) for m in rest]
    if not rest or rest[-1].role != "assistant":
        lines.append("assistant:")
    return prefix, "\n".join(lines)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its content and its Hermes-style tool calls (OpenAI shape).

    Returns ``(text, [])`` when the reply holds no parseable call.
    """
    if "<tool_call>" not in text:
        return text, []
    calls: list[dict[str, Any]] = []
    for raw in _TOOL_CALL.findall(text):
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            continue
        args = data.get("arguments", data.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": data["name"],
                                   "arguments": args if isinstance(args, str)
                                   else json.dumps(args)}})
    if not calls:
        return text, []
    content = _TOOL_CALL.sub("", text).strip()
    return content or None, calls
