"""The server through the official ``openai`` client: endpoints, identity, errors, auth.

Every test drives a real uvicorn server on an ephemeral loopback port over the modeled
executor (no model weights), with the same Engine, scheduler and memory manager as a
simulation run.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from serve_harness import base_url, modeled_config, running_server

MODEL = "smollm2-135m"
PERSONA = [{"role": "system", "content": "You are Ada, a baker in Maple Hollow."}]
TOOL = {"type": "function", "function": {"name": "like", "parameters": {
    "type": "object", "properties": {"post_id": {"type": "integer"}}, "required": ["post_id"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    for name in ("ada-lora", "bob-lora"):
        (adapters / name).mkdir()
        (adapters / name / "adapter_config.json").write_text("{}")
    (adapters / "not-an-adapter").mkdir()
    with running_server(modeled_config(adapters=str(adapters))) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=base_url(server), api_key="unused", max_retries=0)


def ask(content: str) -> list[dict]:
    return PERSONA + [{"role": "user", "content": content}]


def test_sync_chat_returns_text_usage_and_identity(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("Good morning!"), max_tokens=16)
    reply = raw.parse()
    assert reply.choices[0].message.content == "Hello from the modeled engine."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    # No explicit identity: the agent is the hash of its persona.
    assert raw.headers["x-scalesim-identity"] == "system_hash"
    assert raw.headers["x-scalesim-agent"].startswith("sys-")


def test_same_persona_is_the_same_agent_and_reuses_its_prefix(client, server):
    first = client.chat.completions.with_raw_response.create(model=MODEL,
                                                             messages=ask("one"))
    second = client.chat.completions.with_raw_response.create(model=MODEL,
                                                              messages=ask("two"))
    assert first.headers["x-scalesim-agent"] == second.headers["x-scalesim-agent"]
    other = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "You are Bob."},
                               {"role": "user", "content": "one"}])
    assert other.headers["x-scalesim-agent"] != first.headers["x-scalesim-agent"]
    agent = first.headers["x-scalesim-agent"]
    assert any(o.kind == "prefix_kv" and agent in o.users
               for o in server.engine.memory.objects.values())


@pytest.mark.parametrize("how, source, agent", [
    ({"extra_headers": {"X-ScaleSim-Agent": "hdr-agent"},
      "extra_body": {"scalesim": {"agent": "body-agent"}}, "user": "user-agent"},
     "header", "hdr-agent"),
    ({"extra_body": {"scalesim": {"agent": "body-agent"}, "prompt_cache_key": "pck"},
      "user": "user-agent"}, "scalesim.agent", "body-agent"),
    ({"extra_body": {"prompt_cache_key": "pck-agent"}, "user": "user-agent"},
     "prompt_cache_key", "pck-agent"),
    ({"user": "user-agent"}, "user", "user-agent"),
])
def test_identity_resolution_order(client, how, source, agent):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ask("hi"),
                                                           **how)
    assert raw.headers["x-scalesim-identity"] == source
    assert raw.headers["x-scalesim-agent"] == agent


def test_default_headers_name_the_agent(server):
    client = openai.OpenAI(base_url=base_url(server), api_key="unused", max_retries=0,
                           default_headers={"X-ScaleSim-Agent": "villager-7"})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ask("hi"))
    assert raw.headers["x-scalesim-agent"] == "villager-7"


def test_adapter_by_model_name_is_the_agent_and_its_memory(client, server):
    for model in ("ada-lora", f"{MODEL}:ada-lora"):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=ask("hi"))
        assert raw.headers["x-scalesim-identity"] == "model"
        assert raw.headers["x-scalesim-agent"] == "ada-lora"
        assert raw.parse().model == model
    adapter_keys = [k for k in server.engine.memory.objects if k.startswith("adapter:")]
    assert any(k.endswith("/ada-lora") for k in adapter_keys)


def test_models_lists_base_and_adapters_only(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, "ada-lora", "bob-lora"]
    assert client.models.retrieve("bob-lora").id == "bob-lora"


@pytest.mark.parametrize("model", ["gpt-4o-mini", f"{MODEL}:nobody", "nobody-lora"])
def test_unknown_model_or_adapter_is_a_404_in_openai_format(client, model):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=model, messages=ask("hi"))
    assert err.value.body["code"] == "model_not_found"
    assert err.value.body["param"] == "model"


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story"),
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the modeled engine."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_legacy_completions_plain_and_streaming(client):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text == "Hello from the modeled engine."
    stream = client.completions.create(model=MODEL, prompt="Once", stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage.prompt_tokens > 0


def test_async_client_concurrent_requests(server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused", max_retries=0)
        replies = await asyncio.gather(*[
            client.chat.completions.create(
                model=MODEL, messages=ask(f"question {i}"),
                extra_body={"scalesim": {"agent": f"async-{i}"}}) for i in range(8)])
        await client.close()
        return [r.choices[0].message.content for r in replies]
    assert asyncio.run(main()) == ["Hello from the modeled engine."] * 8


def post(server, path: str, body, **headers) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{base_url(server)}{path}", content=data, timeout=10,
                      headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 40_000}]}, "messages"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    response = post(server, "/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server, client):
    response = post(server, "/chat/completions", '{"model": "smollm2-135m", "messages": [')
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=ask("still there?")).choices


def test_a_seed_beyond_64_bits_is_a_400_and_the_server_keeps_serving(server, client):
    body = {"model": MODEL, "messages": ask("hi"), "seed": 2**70, "temperature": 0.5}
    response = post(server, "/chat/completions", body)
    assert response.status_code == 400 and "seed" in response.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=ask("still there?"),
                                          seed=7, temperature=0.5).choices


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    # Structured output is honoured on real executors (test_structured_output); this server's
    # modeled executor writes no real tokens, so it refuses, naming the field.
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"tool_choice": "required", "tools": [TOOL]}, "tool_choice"),
    # What no executor can honour: a schema missing or invalid, a pattern that does not
    # parse, a forced call without tools or of an unknown tool, two constraints at once.
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "objec"}}}}, "response_format.json_schema"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "post"}}, "tools": [TOOL]},
     "tool_choice"),
    ({"tool_choice": "required", "tools": [TOOL], "guided_choice": ["a"]}, "guided_choice"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(server, client, extra, param):
    response = post(server, "/chat/completions", {"model": MODEL, "messages": ask("hi"), **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=ask("still there?")).choices


def test_hostile_bodies_and_paths_get_openai_errors_and_the_server_goes_on(server, client):
    deep = '{"model": "x", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = post(server, "/chat/completions", deep)
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]
    huge = json.dumps({"model": MODEL, "messages": ask("x" * (17 * 2**20))})
    response = post(server, "/chat/completions", huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = post(server, "/images/generations", {"model": MODEL, "prompt": "hi"})
    assert response.status_code == 404 and "no endpoint" in response.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=ask("still there?")).choices


def test_unknown_fields_are_ignored(server):
    body = {"model": MODEL, "messages": ask("hi"), "reasoning_effort": "low",
            "verbosity": "low", "parallel_tool_calls": False, "logit_bias": {},
            "response_format": {"type": "text"}, "metadata": {"run": 1}}
    assert post(server, "/chat/completions", body).status_code == 200


def test_max_tokens_is_clamped_to_the_context(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=100_000)
    assert reply.choices[0].message.content


def test_metrics_count_requests_and_memory(server, client):
    client.chat.completions.create(model=MODEL, messages=ask("count me"))
    assert post(server, "/chat/completions", {"model": MODEL, "messages": []}).status_code == 400
    text = httpx.get(f"{base_url(server)[:-3]}/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['scalesim_requests_total{endpoint="chat",outcome="ok"}']) >= 1
    # One label per endpoint: refused requests count under the label of the served ones.
    assert float(lines['scalesim_requests_total{endpoint="chat",outcome="400"}']) >= 1
    assert not any("chat_completions" in key for key in lines)
    assert float(lines['scalesim_tokens_total{kind="output"}']) >= 8
    assert float(lines['scalesim_memory_hits_total{kind="prefix_kv"}']) >= 1
    assert 'scalesim_memory_bytes{tier="device"}' in lines
    assert float(lines["scalesim_engine_iterations_total"]) >= 1


def test_api_key_required_when_set():
    with running_server(modeled_config(api_key="s3cret")) as server:
        wrong = openai.OpenAI(base_url=base_url(server), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.chat.completions.create(model=MODEL, messages=ask("hi"))
        assert err.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{base_url(server)}/models").status_code == 401
        right = openai.OpenAI(base_url=base_url(server), api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model=MODEL, messages=ask("hi")).choices
        assert httpx.get(f"{base_url(server)[:-3]}/health").status_code == 200


def test_a_stream_whose_prompt_cannot_fit_is_a_400_not_a_broken_stream(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, stream=True,
                                       messages=[{"role": "user", "content": "y" * 40_000}])
    assert err.value.body["param"] == "messages"


def test_a_request_the_engine_rejects_is_a_400_and_the_server_goes_on():
    config = modeled_config()
    config["runtime"] = {**config["runtime"], "kv_cache_tokens": 128}
    with running_server(config) as server:
        client = openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=500)
        assert "KV blocks" in err.value.message
        assert client.chat.completions.create(model=MODEL, messages=ask("hi"),
                                              max_tokens=16).choices


def test_the_servers_cap_on_output_tokens_holds_whatever_a_request_asks():
    with running_server(modeled_config(max_tokens_cap=3)) as capped:
        reply = openai.OpenAI(base_url=base_url(capped), api_key="x").chat.completions.create(
            model=MODEL, messages=ask("hi"), max_tokens=5000)
    assert reply.usage.completion_tokens <= 3


def test_refused_requests_are_in_the_run_record(tmp_path):
    import pandas as pd

    with running_server(modeled_config(trace=str(tmp_path / "run"))) as traced:
        assert post(traced, "/chat/completions", {"model": MODEL, "messages": []}).status_code \
            == 400
        assert post(traced, "/images/generations", {"prompt": "x"}).status_code == 404
        openai.OpenAI(base_url=base_url(traced), api_key="x").chat.completions.create(
            model=MODEL, messages=ask("hi"))
    requests = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    refused = requests[requests.outcome == "refused"]
    assert sorted(refused.status) == [400, 404]
    assert refused.error.str.contains("messages").any()
    assert list(requests[requests.outcome == "ok"].status) == [200]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["refused_requests"] == 2 and summary["calls"] == 1
