"""What the server's settings decide for requests that do not say (issue #28, part 6).

``serve.tool_choice_auto: required`` makes a chat request that offers tools with
``tool_choice`` "auto" (or none) get one call of one of them, unless its last message is a tool
result; ``serve.choice_prompts`` holds a request whose prompt lists options after a phrase the
operator names to exactly one of them; ``serve.default_temperature`` is the temperature of a
request that sets none. The rules are checked on request bodies alone (no
model); the last test runs them on the real model (slow).
"""

from __future__ import annotations

import json
import re

import httpx
import pandas as pd
import pytest

from runtime import Constraint
from scalesim.config import ConfigError, load_serve_config
from scalesim.serve.protocol import (ChatCompletionBody, CompletionBody, prompt_choices,
                                     server_constraint)
from serve_harness import base_url, modeled_config, running_server

POST = {"type": "function", "function": {
    "name": "create_post", "description": "Create a post.",
    "parameters": {"type": "object", "properties": {"content": {"type": "string"}},
                   "required": ["content"]}}}
LIKE = {"type": "function", "function": {
    "name": "like_post", "description": "Like a post.",
    "parameters": {"type": "object", "properties": {"post_id": {"type": "integer"}},
                   "required": ["post_id"]}}}
#: what an operator writes for clients that end a prompt with a list of exact answers
EXACTLY = r"one of the following strings:\n(?P<options>(?s:.*))\.\s*\Z"
#: a prompt in that shape (a multiple-choice question whose answer is a letter)
QUESTION = ("Question: Is it raining?\n  (a) Yes\n  (b) No\nAnswer: (\n"
            "Respond EXACTLY with one of the following strings:\na\nb.")


def chat(*messages: dict, **fields) -> ChatCompletionBody:
    return ChatCompletionBody.model_validate({"model": "m", "messages": list(messages), **fields})


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def patterns(*p: str) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(x) for x in p)


def test_tool_choice_auto_required_forces_a_call_of_the_offered_tools():
    for fields in ({}, {"tool_choice": "auto"}):
        body = chat(user("React to post 1."), tools=[POST, LIKE], **fields)
        assert server_constraint(body, "auto", ()) is None  # the default: free text
        field, constraint = server_constraint(body, "required", ())
        assert field == "serve.tool_choice_auto"
        assert constraint == Constraint.tool_call([POST, LIKE])


def test_tool_choice_auto_required_leaves_tool_results_explicit_choices_and_no_tools_alone():
    after_result = chat(user("React."), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "like_post", "arguments": '{"post_id": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"success": true}'},
        tools=[POST, LIKE])
    assert server_constraint(after_result, "required", ()) is None  # the client's loop ends
    assert server_constraint(chat(user("hi"), tools=[POST], tool_choice="none"),
                             "required", ()) is None
    assert server_constraint(chat(user("hi")), "required", ()) is None
    # Tools whose schema makes no grammar: free text, as auto (the client asked for nothing).
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}
    assert server_constraint(chat(user("hi"), tools=[broken]), "required", ()) is None


def test_choice_prompts_hold_the_reply_to_the_listed_options():
    field, constraint = server_constraint(chat(user(QUESTION)), "auto", patterns(EXACTLY))
    assert field == "serve.choice_prompts" and constraint == Constraint.choice(["a", "b"])
    completion = CompletionBody.model_validate({"model": "m", "prompt": QUESTION})
    assert server_constraint(completion, "auto", patterns(EXACTLY)) == (field, constraint)
    # Only the last user message is read; no match, no pattern or tools: no constraint.
    older = chat(user(QUESTION), {"role": "assistant", "content": "a"}, user("And now?"))
    assert server_constraint(older, "auto", patterns(EXACTLY)) is None
    assert server_constraint(chat(user(QUESTION)), "auto", ()) is None
    assert server_constraint(chat(user(QUESTION), tools=[POST]), "auto",
                             patterns(EXACTLY)) is None


def test_prompt_choices_strips_drops_empty_and_repeated_lines_and_tries_patterns_in_order():
    text = "Pick one of the following strings:\n  Yes \n\nNo\nYes\n."
    assert prompt_choices(text, patterns(EXACTLY)) == ["Yes", "No"]
    assert prompt_choices("no list here", patterns(EXACTLY)) is None
    assert prompt_choices("Options: x|y", patterns(r"nothing(?P<options>.*)",
                                                   r"Options: (?P<options>.*)")) == ["x|y"]
    assert prompt_choices("Options:\n\n", patterns(r"Options:(?P<options>(?s:.*))")) is None


@pytest.mark.parametrize("value, words", [
    (["a("], "not a regular expression"),
    (["Respond with one of: .*"], "no group named 'options'"),
])
def test_bad_choice_prompts_are_configuration_errors(value, words):
    with pytest.raises(ConfigError, match=words):
        load_serve_config(modeled_config(choice_prompts=value))
    with pytest.raises(ConfigError):
        load_serve_config(modeled_config(tool_choice_auto="always"))


def test_a_modeled_server_with_the_settings_answers_as_before():
    """The modeled executor writes placeholder text, not tokens: the settings add nothing
    there (a request that asked for a constraint itself is still refused)."""
    config = modeled_config(tool_choice_auto="required", choice_prompts=[EXACTLY])
    with running_server(config) as server:
        for body in ({"messages": [user(QUESTION)]},
                     {"messages": [user("React.")], "tools": [POST]}):
            response = httpx.post(f"{base_url(server)}/chat/completions",
                                  json={"model": "smollm2-135m", **body}, timeout=10)
            assert response.status_code == 200, response.text


def test_default_temperature_applies_to_requests_that_set_none(tmp_path):
    config = modeled_config(default_temperature=0.7, trace=str(tmp_path))
    with running_server(config) as server:
        for extra in ({}, {"temperature": 0}):
            response = httpx.post(f"{base_url(server)}/chat/completions", timeout=10, json={
                "model": "smollm2-135m", "messages": [user("hi")], **extra})
            assert response.status_code == 200, response.text
    sampling = pd.read_parquet(tmp_path / "trace.parquet")["sampling"].map(json.loads)
    assert sorted(s["temperature"] for s in sampling) == [0.0, 0.7]
    assert "constraint" in pd.read_parquet(tmp_path / "requests.parquet").columns
    with pytest.raises(ConfigError):
        load_serve_config(modeled_config(default_temperature=3))


@pytest.mark.slow
@pytest.mark.model
def test_the_settings_on_the_real_model():
    config = {"runtime": {"executor": "torch", "model": "smollm2-135m", "kv_cache_tokens": 4096,
                          "max_batch_tokens": 256, "memory": {"policy": "scalesim"}},
              "serve": {"port": 0, "max_tokens_cap": 96, "tool_choice_auto": "required",
                        "choice_prompts": [EXACTLY]}}
    with running_server(config) as server:
        url = f"{base_url(server)}/chat/completions"
        reply = httpx.post(url, timeout=120, json={
            "model": "smollm2-135m", "max_tokens": 96, "tools": [POST, LIKE],
            "messages": [{"role": "system", "content": "You are a Reddit user."},
                         user("Post 1 says: fresh rolls today! React to it.")]}).json()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] in {"create_post", "like_post"}
        assert isinstance(json.loads(call["arguments"]), dict)
        for seed in range(3):  # sampled at temperature 1, as the client asks
            reply = httpx.post(url, timeout=120, json={
                "model": "smollm2-135m", "temperature": 1.0, "seed": seed,
                "max_completion_tokens": 5000, "messages": [user(QUESTION)]}).json()
            assert reply["choices"][0]["message"]["content"] in ("a", "b"), reply
