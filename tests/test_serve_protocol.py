"""Request shapes as OASIS, Concordia and AgentScope send them, replayed against the server.

The bodies are written the way those frameworks' OpenAI backends build them (tool schemas with
``strict``, content-part arrays, the ``name`` field, tool results in the history, Concordia's
``max_tokens: 5000``, unknown knobs), and sent raw over HTTP. The modeled engine answers with
a Hermes-style tool call, so the tool-call path is exercised end to end.
"""

from __future__ import annotations

import json

import httpx
import pytest

from scalesim.serve.prompt import parse_tool_calls, render
from scalesim.serve.protocol import Message
from serve_harness import MODELED, base_url, running_server

TOOL_REPLY = '<tool_call>{"name": "create_post", "arguments": {"content": "Fresh bread!"}}</tool_call>'
CREATE_POST = {"type": "function", "function": {
    "name": "create_post", "description": "Create a new post with the given content.",
    "strict": True, "parameters": {"type": "object", "additionalProperties": False,
                                   "properties": {"content": {"type": "string"}},
                                   "required": ["content"]}}}


@pytest.fixture(scope="module")
def server():
    runtime = {**MODELED["runtime"], "modeled": {**MODELED["runtime"]["modeled"],
                                                 "replies": [TOOL_REPLY]}}
    with running_server({"runtime": runtime, "serve": {"port": 0}}) as s:
        yield s


def chat(server, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url(server)}/chat/completions", json=body, timeout=10)


def test_oasis_camel_shape_with_tools_gets_a_tool_call(server):
    body = {"model": "smollm2-135m", "temperature": 0.0, "n": 1, "tool_choice": "auto",
            "messages": [
                {"role": "system", "content": "# OBJECTIVE\nYou're a Twitter user, and I'll "
                 "present you with some posts. After you see the posts, choose some actions."},
                {"role": "user", "content": "After refreshing, you see some posts [{'post_id': 1,"
                 " 'content': 'hello'}]. Pick your action."}],
            "tools": [CREATE_POST, {"type": "function", "function": {
                "name": "do_nothing", "description": "Do nothing.", "strict": True,
                "parameters": {"type": "object", "properties": {}, "required": []}}}]}
    response = chat(server, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "create_post"
    assert json.loads(call["function"]["arguments"]) == {"content": "Fresh bread!"}


def test_oasis_history_with_tool_results(server):
    body = {"model": "smollm2-135m", "tools": [CREATE_POST], "messages": [
        {"role": "system", "content": "You're a Twitter user."},
        {"role": "user", "content": "Pick your action."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "create_post", "arguments": '{"content": "hi"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"success": true, "post_id": 7}'},
        {"role": "user", "content": "Anything else?"}]}
    response = chat(server, body)
    assert response.status_code == 200, response.text


def test_concordia_shape_max_tokens_5000_and_stop(server):
    body = {"model": "smollm2-135m", "max_tokens": 5000, "temperature": 0.5,
            "stop": ["\n\n", "Question:"], "seed": 42, "timeout": 60,
            "messages": [
                {"role": "system", "content": "You always continue sentences provided by the user "
                 "and you never repeat what the user already said."},
                {"role": "user", "content": "Question: Is the sky blue?\nAnswer: "}]}
    response = chat(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_agentscope_shape_content_parts_names_and_streaming(server):
    body = {"model": "smollm2-135m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "name": "system", "content": [
                    {"type": "text", "text": "You're Alice, a helpful assistant."}]},
                {"role": "user", "name": "Bob", "content": [
                    {"type": "text", "text": "Hi Alice, "},
                    {"type": "image_url", "image_url": {"url": "file:///nowhere.png"}},
                    {"type": "text", "text": "what do you see?"}]},
                {"role": "assistant", "name": "Alice", "content": "Hello Bob."},
                {"role": "user", "name": "Bob", "content": "Tell me more."}]}
    with httpx.stream("POST", f"{base_url(server)}/chat/completions", json=body,
                      timeout=10) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["prompt_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == TOOL_REPLY  # no tools in this request: the reply is plain content


def test_streaming_tool_call_is_sent_as_tool_call_deltas(server):
    body = {"model": "smollm2-135m", "stream": True, "tools": [CREATE_POST],
            "messages": [{"role": "user", "content": "post something"}]}
    with httpx.stream("POST", f"{base_url(server)}/chat/completions", json=body,
                      timeout=10) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert [c["function"]["name"] for c in calls] == ["create_post"]
    assert calls[0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_render_keeps_the_persona_and_tools_as_the_stable_prefix():
    messages = [Message(role="system", content="You are Ada."),
                Message(role="user", content="hi")]
    prefix, history, prompt = render(messages, [CREATE_POST])
    assert prefix.endswith("You are Ada.") and "<tools>" in prefix and "create_post" in prefix
    # The tools come first: agents offered the same tools share them as a token prefix.
    bob, _, _ = render([Message(role="system", content="You are Bob."), messages[1]], [CREATE_POST])
    assert bob.split("You are")[0] == prefix.split("You are")[0] and "</tools>" in bob.split("You are")[0]
    assert history == () and prompt == "hi"
    again, _, _ = render(messages[:1] + [Message(role="user", content="other")], [CREATE_POST])
    assert again == prefix  # the same agent keeps the same prefix (its KV is reused)


OASIS_TURNS = [
    Message(role="system", content="You're a Twitter user."),
    Message(role="user", content="Pick your action."),
    Message(role="assistant", content=None, tool_calls=[
        {"id": "call_1", "type": "function",
         "function": {"name": "create_post", "arguments": '{"content": "hi"}'}}]),
    Message(role="tool", tool_call_id="call_1", content='{"success": true, "post_id": 7}'),
    Message(role="assistant", content="Posted."),
    Message(role="user", name="Bob", content="Anything else?"),
]


def test_render_keeps_each_turn_in_its_own_role():
    prefix, history, prompt = render(OASIS_TURNS, [CREATE_POST])
    assert prefix.endswith("You're a Twitter user.") and "<tools>" in prefix
    assert [t["role"] for t in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "Pick your action."
    # The assistant's call, written as the tools preamble asks the model to write calls.
    assert history[1]["content"] == ('<tool_call>\n{"name": "create_post", "arguments": '
                                     '{"content": "hi"}}\n</tool_call>')
    # The tool result: a user turn in Hermes tags, named after the call it answers.
    assert history[2]["content"] == ('<tool_response>\n{"name": "create_post", "content": '
                                     '"{\\"success\\": true, \\"post_id\\": 7}"}\n'
                                     '</tool_response>')
    assert history[3]["content"] == "Posted."
    assert prompt == "Bob: Anything else?"  # a named speaker keeps its name


def test_render_ends_with_a_tool_result_or_an_assistant_turn():
    _, history, prompt = render(OASIS_TURNS[:4])
    assert prompt.startswith("<tool_response>\n") and len(history) == 2
    _, history, prompt = render(OASIS_TURNS[:5])
    assert prompt == "" and history[-1] == {"role": "assistant", "content": "Posted."}
    _, history, prompt = render(OASIS_TURNS[:1])  # a system message alone
    assert history == () and prompt == ""
    _, history, _ = render([Message(role="user", content="a"),
                            Message(role="system", content="Be brief."),
                            Message(role="user", content="b")])
    assert history == ({"role": "user", "content": "a"}, {"role": "system", "content": "Be brief."})


def test_render_keeps_earlier_turns_stable_as_the_conversation_grows():
    conversation = [Message(role="system", content="You are Ada.")]
    renders = []
    for i in range(4):
        conversation.append(Message(role="user", name="Bob", content=f"question {i}"))
        renders.append(render(conversation, [CREATE_POST]))
        conversation.append(Message(role="assistant", content=f" answer {i}\n", tool_calls=[
            {"id": f"c{i}", "function": {"name": "create_post", "arguments": {"n": i}}}]))
        conversation.append(Message(role="tool", tool_call_id=f"c{i}", content="ok"))
    for (prefix, history, prompt), (after, later, _) in zip(renders, renders[1:]):
        assert after == prefix
        assert later[:len(history) + 1] == history + ({"role": "user", "content": prompt},)


def test_a_growing_conversation_counts_each_turn_once(server):
    """The modeled engine counts ``5 + ceil(chars / 4)`` tokens a turn: the second request is
    the first one plus the reply's turn and the new user turn."""
    def turn(text: str) -> int:
        return 5 + -(-len(text) // 4)

    messages = [{"role": "system", "content": "You are Ada."},
                {"role": "user", "content": "Who are you?"}]
    first = chat(server, {"model": "smollm2-135m", "messages": messages}).json()
    reply = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": "And then?"}]
    second = chat(server, {"model": "smollm2-135m", "messages": messages}).json()
    assert first["usage"]["prompt_tokens"] == turn("You are Ada.") + turn("Who are you?")
    assert second["usage"]["prompt_tokens"] == (first["usage"]["prompt_tokens"] + turn(reply)
                                                + turn("And then?"))


@pytest.mark.parametrize("text, content, names", [
    ("plain answer", "plain answer", []),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('Sure. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>', "Sure.", ["a"]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", '
     '"arguments": "{}"}</tool_call>', None, ["a", "b"]),
    ('<tool_call>{"name": "cut", "arguments": {"y": 2}}', None, ["cut"]),  # cut by max_tokens
])
def test_parse_tool_calls(text, content, names):
    got_content, calls = parse_tool_calls(text)
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == names
    for call in calls:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
