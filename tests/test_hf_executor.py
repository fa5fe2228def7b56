"""The hf baseline executor and the model loader on the real SmolLM2-135M weights."""

from __future__ import annotations

import pytest
import torch

from runtime import Request, SamplingParams
from runtime.model.loader import ModelNotFoundError, cache_dir, resolve_model

pytestmark = pytest.mark.model


def serve(engine, *requests: Request) -> dict:
    for r in requests:
        engine.submit(r)
    done = {}
    while engine.has_work():
        for completion in engine.step().finished:
            done[completion.agent_id] = completion
    return done


@pytest.mark.slow
def test_greedy_output_equals_plain_transformers_generate(smol_engine):
    ex = smol_engine.executor
    prefix_ids, prompt_ids = ex.chat.encode("You are Ada, a baker.", "What do you bake?")
    with torch.inference_mode():
        ref = ex.base.generate(torch.tensor([prefix_ids + prompt_ids]), max_new_tokens=8,
                               do_sample=False)
    expected = ex.tokenizer.decode(ref[0, len(prefix_ids + prompt_ids):], skip_special_tokens=True)
    got = serve(smol_engine, Request("ada", "What do you bake?", prefix="You are Ada, a baker.",
                                     sampling=SamplingParams(max_tokens=8)))["ada"]
    assert got.text == expected
    assert got.output_tokens == 8 and got.finish_reason == "length"
    assert got.prompt_tokens == len(prefix_ids) + len(prompt_ids)
    assert got.first_token_wall is not None and got.submit_wall <= got.first_token_wall


@pytest.mark.slow
def test_prefix_tokens_are_a_token_prefix_of_the_full_input(smol_engine):
    chat = smol_engine.executor.chat
    prefix_ids, prompt_ids = chat.encode("You are Bo.", "Hello")
    full = chat.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are Bo."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True, tokenize=False)
    assert chat.tokenizer.decode(prefix_ids + prompt_ids) == full
    assert prefix_ids == chat.encode("You are Bo.", "Something else entirely")[0]


@pytest.mark.slow
def test_stop_strings_cut_the_text(smol_engine):
    got = serve(smol_engine, Request("bo", "Count from one to ten.",
                                     sampling=SamplingParams(max_tokens=40, stop=("5",))))["bo"]
    assert got.finish_reason == "stop" and got.output_tokens < 40
    assert "5" not in got.text and "4" in got.text


@pytest.mark.slow
def test_bad_requests_fail_alone(smol_engine, tmp_path):
    done = serve(
        smol_engine,
        Request("long", "word " * 9000, sampling=SamplingParams(max_tokens=4)),
        Request("adapter", "Hi", adapter=str(tmp_path / "no-adapter"),
                sampling=SamplingParams(max_tokens=4)),
        Request("fine", "Hi", sampling=SamplingParams(max_tokens=4)),
    )
    assert "exceed the model context" in done["long"].error
    assert "no adapter_config.json" in done["adapter"].error
    assert done["fine"].ok and done["fine"].output_tokens == 4


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(smol_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    a = serve(smol_engine, Request("a", "Tell me a word.", sampling=params))["a"]
    b = serve(smol_engine, Request("a", "Tell me a word.", sampling=params))["a"]
    assert a.text == b.text


def test_converted_weights_are_cached():
    directory = resolve_model("smollm2-135m")
    assert directory.is_relative_to(cache_dir())
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    assert resolve_model("smollm2-135m") == directory
    assert resolve_model(str(directory)) == directory


def test_unknown_model_names_say_what_is_accepted():
    with pytest.raises(ModelNotFoundError, match="not a built-in name"):
        resolve_model("gpt-17")
