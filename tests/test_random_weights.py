"""Random-weights runs: text as bytes, ``runtime.random_weights``, and backend choices a GPU
run depends on that can be checked without one."""

from __future__ import annotations

import pytest
import torch

import scalesim
from runtime import Request, SamplingParams, build_engine
from runtime.kv_cache import KVCache
from runtime.model.attention import TorchPagedAttention, flashinfer_unsupported, select_attention
from runtime.model.byte_chat import ByteChat
from scalesim.config import ConfigError


def test_bytes_round_trip_and_turns_are_framed():
    chat = ByteChat(49152, eos_token_ids=(2,))
    prefix, prompt = chat.encode("You are Ada.", "Hi é")
    assert prefix[0] == chat.markers["system"] and prefix[-1] == chat.end
    assert chat.decode(prefix[1:-1]) == "You are Ada."
    assert prompt[-1] == chat.markers["assistant"]  # the generation prompt
    assert chat.decode(prompt[1:-2]) == "Hi é"  # two bytes, one character
    assert all(256 <= t < 49152 and t != 2 for t in prefix + prompt)


def test_an_agents_next_request_extends_its_previous_input():
    chat = ByteChat(1000)
    first = sum(chat.encode("persona", "question one"), [])
    history = ({"role": "user", "content": "question one"},
               {"role": "assistant", "content": "an answer"})
    second = sum(chat.encode("persona", "question two", history), [])
    assert second[:len(first)] == first


def test_any_generated_id_decodes_to_one_printable_character():
    chat = ByteChat(151936, eos_token_ids=(151645, 151643))
    text = chat.decode([5, 100_000, 151_000, 256 + ord("A")])
    assert len(text) == 4 and text.isprintable() and text.endswith("A")


@pytest.mark.parametrize("vocab, eos, message", [(300, (), "cannot hold"),
                                                 (1000, (300,), "end-of-sequence ids")])
def test_a_vocabulary_that_cannot_take_the_codec_is_refused(vocab, eos, message):
    with pytest.raises(ValueError, match=message):
        ByteChat(vocab, eos_token_ids=eos)


def test_a_random_weights_engine_serves_text_in_batches_as_alone():
    engine = build_engine("torch", model="smollm2-135m", random_weights=True,
                          kv_cache_tokens=4096, threads=1)

    def request(i: int) -> Request:
        return Request(f"a{i}", f"question {i}?", prefix=f"persona of agent {i}",
                       sampling=SamplingParams(max_tokens=5, ignore_eos=True))

    alone = []
    for i in range(3):
        engine.submit(request(i))
        while engine.has_work():
            alone += [c.text for c in engine.step().finished]
    together: dict[int, str] = {}
    ids = {engine.submit(request(i)): i for i in range(3)}
    while engine.has_work():
        together.update({ids[c.request_id]: c.text for c in engine.step().finished})
    engine.close()
    assert [together[i] for i in range(3)] == alone
    assert all(len(text) == 5 for text in alone)


def world(runtime: dict) -> dict:
    return {"world": {"class": "tests.tiny_world:Pingers", "params": {"agents": 2}},
            "runtime": runtime, "sim": {"until": 3, "seed": 1}}


def test_random_weights_run_a_world_on_a_profile(tmp_path):
    result = scalesim.simulate(world({"executor": "torch", "model": "smollm2-135m",
                                      "random_weights": True, "threads": 1}),
                               out=tmp_path / "run")
    assert len(result.trace) > 0 and (result.trace.finish_reason != "error").all()


@pytest.mark.parametrize("runtime, message", [
    ({"executor": "hf", "random_weights": True}, "random_weights needs executor torch"),
    ({"executor": "torch", "model": "gpt-9", "random_weights": True},
     "runtime.model: random weights need a built-in profile"),
])
def test_random_weights_misconfigured_name_the_key(tmp_path, runtime, message):
    with pytest.raises(ConfigError, match=message):
        scalesim.simulate(world(runtime), out=tmp_path / "run")


@pytest.mark.parametrize("dtype, head_dim, ok", [(torch.bfloat16, 128, True),
                                                 (torch.float16, 64, True),
                                                 (torch.float32, 64, False),
                                                 (torch.bfloat16, 16, False)])
def test_flashinfer_is_chosen_only_for_what_its_kernels_take(dtype, head_dim, ok):
    assert (flashinfer_unsupported(dtype, head_dim) is None) == ok


def test_the_flashinfer_backend_needs_cuda():
    cache = KVCache(1, 4, 16, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_attention(cache, 4, 2, 64, "flashinfer")
    assert isinstance(select_attention(cache, 4, 2, 64, "torch"), TorchPagedAttention)
