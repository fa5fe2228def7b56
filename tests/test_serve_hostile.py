"""No request can hurt another: every hostile request of issue #28, each followed by a normal one.

The server runs the modeled executor (no weights). Each hostile request gets its 4xx/5xx in
OpenAI's error format and a row in ``requests.parquet``, and the next normal request succeeds.
A fault injected into the engine for one request fails that request alone (a 500), while the
requests batched with it complete; tokenizing a huge prompt never holds up a small request.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from runtime import Request, SamplingParams, build_engine
from runtime.embedding import EmbeddingPass
from serve_harness import base_url, modeled_config, running_server

MODEL = "smollm2-135m"
PERSONA = {"role": "system", "content": "You are Ada, a baker in Maple Hollow."}
TOOL = {"type": "function", "function": {"name": "like", "parameters": {
    "type": "object", "properties": {"post_id": {"type": "integer"}}}}}


def chat(content: str = "hi", **extra) -> dict:
    return {"model": MODEL, "messages": [PERSONA, {"role": "user", "content": content}], **extra}


#: (name, path, body: a dict or the raw text sent, the statuses allowed)
HOSTILE = [
    ("seed beyond 64 bits", "/chat/completions", chat(seed=2**70, temperature=0.5), {400}),
    ("20 MB body", "/chat/completions", json.dumps(chat("x" * 20_000_000)), {413}),
    ("100,000-deep JSON", "/chat/completions",
     '{"model": "x", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", {400}),
    ("negative temperature", "/chat/completions", chat(temperature=-1), {400}),
    ("temperature above 2", "/chat/completions", chat(temperature=3), {400}),
    ("NaN temperature", "/chat/completions",
     json.dumps(chat()).replace('"model"', '"temperature": NaN, "model"'), {400}),
    ("tiny temperature", "/chat/completions", chat(temperature=1e-300), {200}),
    ("top_p 0", "/chat/completions", chat(top_p=0), {400}),
    ("top_p above 1", "/chat/completions", chat(top_p=1.5), {400}),
    ("negative top_k", "/chat/completions", chat(top_k=-5), {400}),
    ("top_k beyond the vocabulary", "/chat/completions", chat(top_k=2**70), {200}),
    ("max_tokens 0", "/chat/completions", chat(max_tokens=0), {400}),
    ("max_tokens negative", "/chat/completions", chat(max_tokens=-1), {400}),
    ("max_tokens huge", "/chat/completions", chat(max_tokens=2**70), {200}),
    ("unknown adapter", "/chat/completions", {**chat(), "model": "no-such-lora"}, {404}),
    ("not an adapter", "/chat/completions", {**chat(), "model": "not-an-adapter"}, {400, 404}),
    ("messages not a list", "/chat/completions", {"model": MODEL, "messages": "hello"}, {400}),
    ("temperature a string", "/chat/completions", chat(temperature="hot"), {400}),
    ("seed a string", "/chat/completions", chat(seed="abc"), {400}),
    ("stop a number", "/chat/completions", chat(stop=5), {400}),
    ("content a number", "/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, {400}),
    ("body a list", "/chat/completions", [1, 2, 3], {400}),
    ("not JSON", "/chat/completions", "{'model': ", {400}),
    ("not UTF-8", "/chat/completions", b"\xff\xfe{\x00", {400}),
    ("prompt over the context", "/chat/completions", chat("word " * 40_000), {400}),
    ("prompt over the context (completions)", "/completions",
     {"model": MODEL, "prompt": "word " * 40_000}, {400}),
    ("tool_choice of an unknown tool", "/chat/completions",
     chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "post"}}), {400}),
    ("n > 1", "/chat/completions", chat(n=2), {400}),
    ("logprobs", "/chat/completions", chat(logprobs=True), {400}),
    ("two prompts", "/completions", {"model": MODEL, "prompt": ["a", "b"]}, {400}),
    ("token-id prompt", "/completions", {"model": MODEL, "prompt": [1, 2, 3]}, {400}),
    ("embeddings on the modeled executor", "/embeddings", {"model": MODEL, "input": "hi"},
     {400}),
    ("embeddings of nothing", "/embeddings", {"model": MODEL, "input": []}, {400}),
    ("unknown path", "/images/generations", {"model": MODEL, "prompt": "a cat"}, {404}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    (adapters / "ada-lora").mkdir()
    (adapters / "ada-lora" / "adapter_config.json").write_text("{}")
    (adapters / "not-an-adapter").mkdir()
    run = tmp_path_factory.mktemp("run") / "trace"
    with running_server(modeled_config(adapters=str(adapters), trace=str(run))) as s:
        s.run_dir = run
        yield s


def post(server, path: str, body, timeout: float = 60.0) -> httpx.Response:
    url = f"{base_url(server)}{path}"
    if isinstance(body, (dict, list)):
        return httpx.post(url, json=body, timeout=timeout)
    content = body.encode() if isinstance(body, str) else body
    return httpx.post(url, content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def assert_openai_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("name, path, body, statuses", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_each_hostile_request_then_a_normal_one(server, name, path, body, statuses):
    response = post(server, path, body)
    assert response.status_code in statuses, (name, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_openai_error(response)
    normal = post(server, "/chat/completions", chat("still there?"))
    assert normal.status_code == 200, normal.text
    assert normal.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{base_url(server)[:-3]}/health").json()["status"] == "ok"


def test_a_fault_of_one_request_fails_it_alone_in_its_batch(server):
    """The engine fails a request its executor raises on (here: before changing anything),
    with a 500; the requests in the same batch complete, and later ones too."""
    executor = server.engine.executor
    real = executor.execute
    batches: list[int] = []

    def poisoned(batch):
        batches.append(len(batch))
        if any("POISON" in seq.request.prompt for seq in batch):
            raise RuntimeError("injected fault")
        return real(batch)

    executor.execute = poisoned
    try:
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(post, server, "/chat/completions",
                                   chat("POISON" if i == 2 else f"hello {i}")) for i in range(5)]
            responses = [f.result() for f in futures]
    finally:
        executor.execute = real
    assert [r.status_code for r in responses] == [200, 200, 500, 200, 200]
    error = assert_openai_error(responses[2])
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    assert post(server, "/chat/completions", chat("and now?")).status_code == 200


def test_a_small_request_is_not_held_up_by_tokenizing_a_huge_one(server):
    """While a huge prompt is being tokenized (held there until the small request is
    answered), a small request is tokenized, served and answered; nothing is tokenized on the
    engine thread."""
    engine = server.engine
    real = engine.encode
    huge_started, small_done = threading.Event(), threading.Event()
    threads: list[str] = []

    def encode(prefix, prompt, history=()):
        threads.append(threading.current_thread().name)
        if len(prompt) > 1_000_000:
            huge_started.set()
            assert small_done.wait(60), "the small request was held up"
        return real(prefix, prompt, history)

    engine.encode = encode
    order: list[str] = []
    try:
        with ThreadPoolExecutor(1) as pool:
            huge = pool.submit(post, server, "/chat/completions", chat("word " * 400_000))
            assert huge_started.wait(60)
            small = post(server, "/chat/completions", chat("a small question"))
            order.append("small")
            small_done.set()
            huge_response = huge.result()
            order.append("huge")
    finally:
        engine.encode = real
        small_done.set()
    assert small.status_code == 200 and order == ["small", "huge"]
    assert huge_response.status_code == 400  # longer than the context
    assert "scalesim-engine" not in threads and threads


def test_every_request_is_in_the_run_record_with_its_outcome(server):
    """Written at shutdown: so this reads the run directory of a server of its own."""
    config = modeled_config(trace=str(server.run_dir.parent / "own"))
    with running_server(config) as own:
        assert post(own, "/chat/completions", chat(temperature=-1)).status_code == 400
        assert post(own, "/embeddings", {"model": MODEL, "input": "x"}).status_code == 400
        executor, real = own.engine.executor, own.engine.executor.execute

        def broken(batch):
            raise RuntimeError("injected fault")
        executor.execute = broken
        assert post(own, "/chat/completions", chat("fails")).status_code == 500
        executor.execute = real
        assert post(own, "/chat/completions", chat("works")).status_code == 200
        text = httpx.get(f"{base_url(own)[:-3]}/metrics").text
    requests = pd.read_parquet(server.run_dir.parent / "own" / "requests.parquet")
    rows = sorted(zip(requests.endpoint, requests.outcome, requests.status))
    assert rows == [("chat", "error", 500), ("chat", "ok", 200), ("chat", "refused", 400),
                    ("embeddings", "refused", 400)]
    assert 'scalesim_requests_total{endpoint="embeddings",outcome="400"} 1' in text
    assert 'scalesim_requests_total{endpoint="chat",outcome="error"} 1' in text


def test_models_label_embeddings_as_pooled_hidden_states(server):
    card, = [m for m in httpx.get(f"{base_url(server)}/models").json()["data"]
             if m["id"] == MODEL]
    embeddings = card["embeddings"]
    assert embeddings["kind"] == "pooled_hidden_states" and embeddings["pooling"] == "mean"
    assert "not a trained embedding model" in embeddings["note"]
    assert embeddings["available"] is False and "torch" in embeddings["why_not"]


def test_an_access_log_line_per_request(server, caplog):
    with caplog.at_level("INFO", logger="scalesim.serve.access"):
        post(server, "/chat/completions", chat("log me"))
        post(server, "/chat/completions", chat(temperature=-1))
    lines = [r.getMessage() for r in caplog.records if r.name == "scalesim.serve.access"]
    assert any('"POST /v1/chat/completions" 200' in line and "agent=sys-" in line
               for line in lines)
    assert any('"POST /v1/chat/completions" 400' in line for line in lines)


# -- the engine alone ------------------------------------------------------------------------


def test_the_engine_bisects_a_failed_batch_down_to_the_request_at_fault():
    engine = build_engine("modeled", model="smollm2-135m")
    real = engine.executor.execute
    seen: list[int] = []

    def poisoned(batch):
        seen.append(len(batch))
        if any(seq.request.prompt == "POISON" for seq in batch):
            raise ValueError("injected fault")
        return real(batch)

    engine.executor.execute = poisoned
    ids = [engine.submit(Request(f"a{i}", "POISON" if i == 5 else f"hi {i}",
                                 sampling=SamplingParams(max_tokens=4))) for i in range(8)]
    done = {}
    while engine.has_work():
        done.update({c.request_id: c for c in engine.step().finished})
    engine.close()
    assert seen[0] == 8  # all of them in one batch first
    assert [done[i].ok for i in ids] == [True] * 5 + [False] + [True] * 2
    assert done[ids[5]].internal_error and "injected fault" in done[ids[5]].error


def test_a_row_that_cannot_be_sampled_fails_alone(monkeypatch):
    """torch: masking and sampling come after the shared forward pass; a row that raises
    there fails its request, the other rows get their tokens."""
    import runtime.executors.torch as torch_executor

    real = torch_executor.sample

    def sample(logits, params, generators):
        if any(p.top_k == 7 for p in params):
            raise RuntimeError("injected sampling fault")
        return real(logits, params, generators)

    monkeypatch.setattr(torch_executor, "sample", sample)
    engine = build_engine("torch", model="smollm2-135m", random_weights=True,
                          kv_cache_tokens=1024, threads=1)
    ids = [engine.submit(Request(f"a{i}", f"question {i}", sampling=SamplingParams(
        max_tokens=3, top_k=7 if i == 1 else 0, ignore_eos=True))) for i in range(3)]
    done = {}
    while engine.has_work():
        done.update({c.request_id: c for c in engine.step().finished})
    engine.close()
    assert [done[i].ok for i in ids] == [True, False, True]
    assert done[ids[1]].internal_error and done[ids[0]].output_tokens == 3


def test_embedding_passes_in_chunks_equal_one_pass():
    """A long input embedded a chunk at a time gives the vector of one pass over all of it."""
    engine = build_engine("torch", model="smollm2-135m", random_weights=True,
                          kv_cache_tokens=1024, threads=1)
    ids = list(range(300, 340))
    whole = engine.embedding(ids)
    assert isinstance(whole, EmbeddingPass)
    whole.chunk_tokens = 1000
    chunked = engine.embedding(ids)
    chunked.chunk_tokens = 7
    steps = 0
    while not chunked.step():
        steps += 1
    assert whole.step() and steps == 5
    a, b = whole.vector(), chunked.vector()
    engine.close()
    assert len(a) == 576 and abs(sum(x * x for x in a) - 1) < 1e-4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_embeddings_over_http_on_a_random_weights_engine(tmp_path):
    """The OpenAI request and response shapes (text, texts, token ids; float and base64),
    usage, the chunked pass through the engine loop, metrics and the run record."""
    import base64

    import numpy as np
    import openai

    config = {"runtime": {"executor": "torch", "model": MODEL, "random_weights": True,
                          "kv_cache_tokens": 1024, "max_batch_tokens": 16, "threads": 1},
              "serve": {"port": 0, "trace": str(tmp_path / "run")}}
    with running_server(config) as s:
        client = openai.OpenAI(base_url=base_url(s), api_key="-", max_retries=0)
        one = client.embeddings.create(model=MODEL, input="a baker in Maple Hollow",
                                       encoding_format="float")
        vector = np.array(one.data[0].embedding)
        assert vector.shape == (576,) and abs(np.linalg.norm(vector) - 1) < 1e-4
        assert one.usage.prompt_tokens == len("a baker in Maple Hollow".encode())
        many = post(s, "/embeddings", {"model": MODEL, "input": ["a baker in Maple Hollow",
                                                                 "a smith"],
                                       "encoding_format": "base64"}).json()
        assert [d["index"] for d in many["data"]] == [0, 1]
        decoded = np.frombuffer(base64.b64decode(many["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, vector, atol=1e-5)
        ids = post(s, "/embeddings", {"model": MODEL, "input": [[300, 301, 302]]}).json()
        assert ids["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        bad = post(s, "/embeddings", {"model": MODEL, "input": [[10**9]]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        assert post(s, "/embeddings", {"model": MODEL, "input": "x",
                                       "dimensions": 8}).status_code == 400
        card, = httpx.get(f"{base_url(s)}/models").json()["data"]
        assert card["embeddings"]["available"] and card["embeddings"]["dimensions"] == 576
        # Decoding goes on meanwhile: a chat request is answered too.
        assert client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
            {"role": "user", "content": "hi"}]).choices
        text = httpx.get(f"{base_url(s)[:-3]}/metrics").text
    assert 'scalesim_requests_total{endpoint="embeddings",outcome="ok"} 3' in text
    requests = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    embedded = requests[requests.endpoint == "embeddings"]
    assert sorted(embedded.outcome) == ["ok", "ok", "ok", "refused", "refused"]
    assert (embedded[embedded.outcome == "ok"].request_id > 0).all()
