"""The torch executor on the real SmolLM2-135M: parity with transformers/peft, batching, prefix
reuse, multi-LoRA batches, preemption, sampling and per-request failures."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.make_adapters import make_adapters
from runtime import Request, SamplingParams
from runtime.engine import Engine, build_engine
from runtime.executors import torch as torch_executor
from runtime.model.profiles import PROFILES, profile

pytestmark = [pytest.mark.model, pytest.mark.slow]  # every test loads the real model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    return make_adapters(out, PROFILES["smollm2-135m"], n=8, rank=8, seed=1, b_std=0.02)


def engine(hf, kv_cache_tokens: int = 4096, max_num_seqs: int = 16, max_batch_tokens: int = 256,
           **options) -> Engine:
    model, tokenizer = hf
    return build_engine("torch", hf_model=model, tokenizer=tokenizer,
                        kv_cache_tokens=kv_cache_tokens, max_num_seqs=max_num_seqs,
                        max_batch_tokens=max_batch_tokens, **options)


def serve(eng: Engine, *requests: Request) -> list:
    ids = [eng.submit(r) for r in requests]
    done = {}
    while eng.has_work():
        for completion in eng.step().finished:
            done[completion.request_id] = completion
    return [done[i] for i in ids]


def capture_logits(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = torch_executor.sample

    def spy(logits, params, generators):
        seen.append(logits.clone())
        return real(logits, params, generators)

    monkeypatch.setattr(torch_executor, "sample", spy)
    return seen


#: Long enough to fill a KV block with the template's markers (only full blocks are cached).
ADA = "You are Ada, a cheerful baker who loves rye bread, early mornings and the smell of the oven."


def call(agent: str, prompt: str, prefix: str = ADA,
         adapter: str | None = None, **sampling) -> Request:
    sampling.setdefault("max_tokens", 6)
    return Request(agent, prompt, prefix=prefix, adapter=adapter, sampling=SamplingParams(**sampling))


def test_logits_match_transformers_fresh_and_after_reused_prefix(hf, monkeypatch):
    model, _ = hf
    eng = engine(hf)
    seen = capture_logits(monkeypatch)
    first, second = serve(eng, call("ada", "Good morning!", max_tokens=1))[0], None
    second = serve(eng, call("ada", "What do you bake today?", max_tokens=1))[0]
    assert first.cached_tokens == 0 and first.memory.misses == {"prefix_kv": 1}
    assert second.cached_tokens > 0 and second.memory.hits == {"prefix_kv": 1}
    for logits, prompt in zip(seen, ["Good morning!", "What do you bake today?"]):
        p, q = eng.executor.chat.encode(ADA, prompt)
        with torch.no_grad():
            ref = model(torch.tensor([p + q])).logits[0, -1]
        assert torch.allclose(logits[0], ref, atol=1e-3), (logits[0] - ref).abs().max()
    # Reused: the full blocks the two inputs share (the persona and the user turn's marker).
    first_ids = sum(eng.executor.chat.encode(ADA, "Good morning!"), [])
    common = next(i for i, (a, b) in enumerate(zip(first_ids, p + q)) if a != b)
    assert second.cached_tokens == common // 16 * 16 >= len(p) // 16 * 16 > 0


def test_greedy_matches_transformers_generate_with_prefix_reuse(hf):
    model, tokenizer = hf
    eng = engine(hf)
    prompts = ["Hello!", "What is your favourite bread?"]
    got = [serve(eng, call("ada", p, max_tokens=10))[0] for p in prompts]
    for completion, prompt in zip(got, prompts):
        p, q = eng.executor.chat.encode(ADA, prompt)
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p + q]), max_new_tokens=10, do_sample=False)
        assert completion.text == tokenizer.decode(ref[0, len(p + q):], skip_special_tokens=True)
    assert got[1].cached_tokens > 0


def test_lora_logits_match_peft(hf, adapters, monkeypatch):
    from peft import PeftModel

    model, _ = hf
    eng = engine(hf)
    seen = capture_logits(monkeypatch)
    got = serve(eng, call("ada", "Who are you?", adapter=adapters[0], max_tokens=2))[0]
    assert got.memory.misses == {"prefix_kv": 1, "adapter": 1}
    p, q = eng.executor.chat.encode(ADA, "Who are you?")
    peft_model = PeftModel.from_pretrained(model, adapters[0]).eval()
    try:
        first = eng.executor.tokenizer.encode(got.text, add_special_tokens=False)[:1]
        with torch.no_grad():
            ref = peft_model(torch.tensor([p + q + first])).logits[0, -2:]
            with peft_model.disable_adapter():
                base = peft_model(torch.tensor([p + q])).logits[0, -1]
    finally:
        peft_model.unload()
    # Prefill (per-segment LoRA) and the decode step after it (the all-slots batched LoRA).
    assert torch.allclose(seen[0][0], ref[0], atol=1e-3)
    assert torch.allclose(seen[1][0], ref[1], atol=1e-3)
    assert (base - ref[0]).abs().max() > 0.1  # the adapter really changes the output


@pytest.mark.slow
def test_mixed_batch_of_eight_adapters_equals_running_alone(hf, adapters):
    def calls():
        return [call(f"agent{i}", f"It is {6 + i} o'clock. What do you do?",
                     prefix=f"You are villager number {i}.", adapter=a, max_tokens=8)
                for i, a in enumerate(adapters)]

    alone = [serve(engine(hf), c)[0].text for c in calls()]
    eng = engine(hf, max_batch_tokens=64)  # small budget: prefill chunks mix with decodes
    together = serve(eng, *calls())
    assert [c.text for c in together] == alone
    assert len(set(alone)) > 1
    again = serve(eng, *calls())  # second round: prefixes and adapters are already resident
    assert all(c.cached_tokens > 0 and c.memory.hits == {"prefix_kv": 1, "adapter": 1}
               for c in again)


@pytest.mark.slow
def test_small_pool_preempts_and_still_finishes_every_request(hf):
    requests = [call(f"a{i}", f"Count to {i + 3}.", prefix="", max_tokens=12) for i in range(6)]
    expected = [c.text for c in serve(engine(hf), *requests)]
    eng = engine(hf, kv_cache_tokens=128, block_size=8)
    got = serve(eng, *[call(f"a{i}", f"Count to {i + 3}.", prefix="", max_tokens=12)
                       for i in range(6)])
    assert [c.text for c in got] == expected
    assert eng.scheduler.num_preemptions > 0
    assert eng.executor.cache.num_free == eng.executor.cache.num_blocks - len(
        {b for seg in eng.executor.prefixes.segments() for b in seg.blocks})


def test_bad_requests_fail_alone(hf, adapters, tmp_path):
    wrong_rank = make_adapters(tmp_path / "r32", PROFILES["smollm2-135m"], n=1, rank=32)[0]
    other_model = make_adapters(tmp_path / "qwen", profile("qwen2.5-0.5b", num_layers=2), n=1,
                                rank=4)[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    eng = engine(hf, kv_cache_tokens=512)
    results = serve(
        eng,
        call("good", "Hello!"),
        call("missing", "Hello!", adapter=str(tmp_path / "nowhere")),
        call("rank", "Hello!", adapter=wrong_rank),
        call("other", "Hello!", adapter=other_model),
        call("broken", "Hello!", adapter=str(broken)),
        call("long", "word " * 600),
        call("good2", "Hi!", adapter=adapters[1]),
    )
    by_agent = {c.agent_id: c for c in results}
    assert by_agent["good"].ok and by_agent["good2"].ok and by_agent["good"].output_tokens == 6
    messages = {"missing": "no adapter_config.json", "rank": "exceeds the engine's max_lora_rank",
                "other": "another model", "broken": "no adapter_model.safetensors",
                "long": "KV blocks"}
    for agent, text in messages.items():
        assert by_agent[agent].finish_reason == "error"
        assert text in by_agent[agent].error, by_agent[agent].error


@pytest.mark.slow
def test_sampling_seed_stop_and_eos(hf):
    eng = engine(hf)
    hot = dict(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    alone = serve(eng, call("s", "Tell me a story.", **hot))[0].text
    mixed = serve(eng, call("x", "Say hi.", max_tokens=20), call("s", "Tell me a story.", **hot),
                  call("y", "Count to five.", temperature=1.0, max_tokens=20))
    assert mixed[1].text == alone
    greedy = serve(eng, call("g", "Count from one to ten.", max_tokens=30))[0]
    stop_at = greedy.text[len(greedy.text) // 2:][:3]
    stopped = serve(eng, call("g", "Count from one to ten.", max_tokens=30, stop=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy.text[:greedy.text.find(stop_at)]
    short = serve(eng, call("e", "Reply with one word: yes or no?", max_tokens=40))[0]
    assert short.finish_reason == "stop" and short.output_tokens < 40


def test_int8_kv_pool_serves_with_reuse_close_to_transformers(hf, monkeypatch):
    """runtime.kv_cache_dtype int8: a quarter of float32's KV bytes per block, prefix reuse over
    the quantized rows, and logits of every step close to transformers' (greedy choices the same
    wherever transformers' top two are apart)."""
    model, _ = hf
    eng = engine(hf, kv_cache_dtype="int8")
    plain = engine(hf)
    assert eng.executor.cache.block_nbytes * 256 == plain.executor.cache.block_nbytes * 68
    seen = capture_logits(monkeypatch)
    prompts = ["Good morning!", "What do you bake today?"]
    got = [serve(eng, call("ada", p, max_tokens=8))[0] for p in prompts]
    assert got[1].cached_tokens > 0 and got[1].memory.hits == {"prefix_kv": 1}
    steps = iter(seen)
    for completion, prompt in zip(got, prompts):
        p, q = eng.executor.chat.encode(ADA, prompt)
        step_logits = [next(steps)[0] for _ in range(completion.output_tokens)]
        ids = p + q + [int(logits.argmax()) for logits in step_logits]  # greedy: what it chose
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, len(p + q) - 1:-1]
        for i, (row, logits) in enumerate(zip(ref, step_logits)):
            top2 = row.topk(2).values
            assert (logits - row).abs().max() < 0.05 * row.abs().max(), i
            if top2[0] - top2[1] > 0.5:
                assert logits.argmax() == row.argmax()
