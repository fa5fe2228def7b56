"""The server on the real SmolLM2-135M with the torch engine, through the ``openai`` client.

Greedy replies must equal what the engine answers in-process for the same request; streaming
must give the same text as a plain call; an agent's second call reuses its persona-prefix KV;
an adapter named in the ``model`` field changes the reply, concurrent requests of several
agents are served in shared batches, and structured output (``response_format``,
``tool_choice``, ``guided_choice``) holds replies to what was asked.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from experiments.make_adapters import make_adapters
from runtime import Request, SamplingParams, build_engine
from runtime.model.profiles import PROFILES
from serve_harness import base_url, running_server

pytestmark = [pytest.mark.model, pytest.mark.slow]
PERSONA = "You are Ada, the baker of Maple Hollow. Answer in one short sentence."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    make_adapters(adapters, PROFILES["smollm2-135m"], n=2, rank=8, seed=3, b_std=0.05)
    config = {"runtime": {"executor": "torch", "model": "smollm2-135m", "kv_cache_tokens": 4096,
                          "max_num_seqs": 16, "max_batch_tokens": 256,
                          "memory": {"policy": "scalesim"}},
              "serve": {"port": 0, "adapters": str(adapters), "default_max_tokens": 24}}
    with running_server(config) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=base_url(server), api_key="-", max_retries=0)


def ask(client, content: str, model: str = "smollm2-135m", **extra):
    return client.chat.completions.create(
        model=model, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": PERSONA}, {"role": "user", "content": content}],
        **extra)


def test_reply_matches_the_engine_and_streaming_matches_plain(client, hf):
    reply = ask(client, "What do you bake?")
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens <= 16
    stream = ask(client, "What do you bake?", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # The same call made in-process on an engine of its own gives the same greedy text.
    model, tokenizer = hf
    engine = build_engine("torch", hf_model=model, tokenizer=tokenizer, kv_cache_tokens=1024)
    engine.submit(Request("ada", "What do you bake?", PERSONA, SamplingParams(max_tokens=16)))
    done = []
    while engine.has_work():
        done += engine.step().finished
    engine.close()
    assert [c.text for c in done] == [text]


def test_second_call_of_an_agent_reuses_its_prefix_kv(client):
    first = ask(client, "Good morning!", user="ada")
    second = ask(client, "Any rye today?", user="ada")
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert first.usage.prompt_tokens > 0


def test_adapter_by_model_name_changes_the_reply(client):
    models = [m.id for m in client.models.list()]
    assert len(models) == 3
    base = ask(client, "Tell me about bread.").choices[0].message.content
    tuned = ask(client, "Tell me about bread.", model=models[1]).choices[0].message.content
    tuned_again = ask(client, "Tell me about bread.",
                      model=f"smollm2-135m:{models[1]}").choices[0].message.content
    assert tuned == tuned_again
    assert tuned != base


def test_concurrent_agents_share_batches(server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url(server), api_key="-", max_retries=0)
        replies = await asyncio.gather(*[
            client.chat.completions.create(
                model="smollm2-135m", max_tokens=8, temperature=0,
                messages=[{"role": "system", "content": f"You are villager {i}."},
                          {"role": "user", "content": "Say hello."}]) for i in range(6)])
        await client.close()
        return [r.choices[0].message.content for r in replies]
    texts = asyncio.run(main())
    assert all(texts)
    assert server.loop.metrics.max_batch >= 2


def test_the_server_keeps_personas_in_the_persistent_store(tmp_path, hf):
    """``runtime.memory.kv_store`` reaches the server's engine: a persona computed by one
    server is found in the store by the next one (it was once dropped on the way)."""
    store = tmp_path / "store"
    config = {"runtime": {"executor": "torch", "model": "smollm2-135m", "kv_cache_tokens": 2048,
                          "memory": {"policy": "lru", "kv_store": str(store)}},
              "serve": {"port": 0, "default_max_tokens": 4}}
    summaries = []
    for run in ("first", "second"):
        trace = tmp_path / run
        with running_server({**config, "serve": {**config["serve"], "trace": str(trace)}}) as s:
            ask(openai.OpenAI(base_url=base_url(s), api_key="-", max_retries=0), "Hello.")
        summaries.append(json.loads((trace / "summary.json").read_text()))
        assert any(store.rglob("*")), "nothing was written to the store"
    first, second = (s["memory"]["kv_store"] for s in summaries)
    assert first["dir"] == second["dir"] == str(store)
    assert first["entries_found"] == 0
    assert second["entries_found"] >= 1


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "celsius": {"type": "integer", "minimum": -50, "maximum": 60}},
    "required": ["city", "celsius"], "additionalProperties": False}
LIKE = {"type": "function", "function": {"name": "like_post", "parameters": {
    "type": "object", "properties": {"post_id": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["post_id"]}}}
POST = {"type": "function", "function": {"name": "create_post", "parameters": {
    "type": "object", "properties": {"content": {"type": "string", "maxLength": 40}},
    "required": ["content"]}}}


def test_structured_output_over_http(client):
    """response_format json_schema and json_object, tool_choice required and named, and vLLM's
    guided_choice, on the real model: every reply is what was asked for."""
    def ask(client, content: str, **extra):
        return client.chat.completions.create(
            model="smollm2-135m", temperature=0, messages=[
                {"role": "system", "content": PERSONA}, {"role": "user", "content": content}],
            **extra)

    reply = ask(client, "The weather in Paris, as JSON.", max_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "celsius"} and isinstance(data["celsius"], int)
    reply = ask(client, "Your favourite bread, as JSON.", max_tokens=48,
                response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    for choice, names in (("required", {"like_post", "create_post"}),
                          ({"type": "function", "function": {"name": "create_post"}},
                           {"create_post"})):
        reply = ask(client, "Post 7 says: fresh rolls today! React to it.", max_tokens=64,
                    tools=[LIKE, POST], tool_choice=choice)
        message = reply.choices[0]
        assert message.finish_reason == "tool_calls", message
        call, = message.message.tool_calls
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        assert set(args) == ({"post_id"} if call.function.name == "like_post" else {"content"})
    reply = ask(client, "Do you bake bread? Answer yes or no.", max_tokens=4,
                extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    # Streaming a constrained reply gives the same text as a plain call.
    stream = ask(client, "Do you bake bread? Answer yes or no.", max_tokens=4, stream=True,
                 extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        reply.choices[0].message.content
    text = client.completions.create(model="smollm2-135m", prompt="Pick a colour.", max_tokens=4,
                                     extra_body={"guided_choice": ["red", "green"]})
    assert text.choices[0].text in ("red", "green")


def test_embeddings_are_the_mean_of_transformers_last_hidden_state(client, hf):
    """/v1/embeddings on the real model: the L2-normalised mean over the input's tokens of
    transformers' last hidden state, a chunk of at most max_batch_tokens at a time; related
    texts are closer than unrelated ones; a normal request still succeeds after a bad one."""
    import numpy as np
    import torch

    model, tokenizer = hf
    texts = ["Ada bakes bread in Maple Hollow every morning. " * 30,
             "Ada bakes rolls in Maple Hollow.", "The stock market fell sharply today."]
    reply = client.embeddings.create(model="smollm2-135m", input=texts)
    got = np.array([d.embedding for d in reply.data])
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(ids[0]) > 256  # longer than max_batch_tokens: computed in chunks
    assert reply.usage.prompt_tokens == sum(map(len, ids))
    with torch.no_grad():
        for row, token_ids in zip(got, ids):
            hidden = model.model(torch.tensor([token_ids])).last_hidden_state[0].mean(0)
            expected = torch.nn.functional.normalize(hidden, dim=0).numpy()
            assert np.abs(row - expected).max() < 1e-3
    assert got[0] @ got[1] > got[0] @ got[2]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2-135m", input=[[10**9]])
    assert ask(client, "Still baking?").choices[0].message.content
