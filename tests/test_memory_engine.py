"""The memory manager inside the real torch engine: adapters move, greedy outputs do not change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from runtime import Request, SamplingParams
from runtime.lora import module_shapes

pytestmark = [pytest.mark.model, pytest.mark.slow]


def random_adapter(path, config, rank: int = 4, seed: int = 0, scale: float = 0.5) -> str:
    """A PEFT adapter on q_proj and v_proj with random weights big enough to change outputs."""
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_layers):
        for module in ("q_proj", "v_proj"):
            fan_in, fan_out = shapes[module]
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank,
         "target_modules": ["q_proj", "v_proj"]}))
    return str(path)


def make_engine(hf, policy: str = "lru", **memory):
    from runtime import build_engine

    model, tokenizer = hf
    return build_engine("torch", hf_model=model, tokenizer=tokenizer, max_num_seqs=2,
                        kv_cache_tokens=4096, policy=policy, **memory)


def serve(engine, requests: list[Request]) -> dict[str, tuple[str, dict]]:
    for r in requests:
        r.request_id = -1
        engine.submit(r)
    out = {}
    while engine.has_work():
        for done in engine.step().finished:
            assert done.ok, done.error
            out[done.agent_id] = (done.text, dict(done.memory.misses))
    return out


def test_policies_move_adapters_but_not_outputs(hf, tmp_path) -> None:
    config = make_engine(hf).executor.config
    paths = [random_adapter(tmp_path / f"a{i}", config, seed=i) for i in range(4)]
    one = None

    def requests() -> list[Request]:
        return [Request(f"agent{i % 4}", "Name a color.", prefix="You are terse.",
                        sampling=SamplingParams(max_tokens=3), adapter=paths[i % 4])
                for i in range(6)]

    results = {}
    for policy in ("infinite", "lru", "scalesim", "none"):
        adapter_bytes = None if one is None else one.nbytes
        engine = make_engine(hf, policy, device_bytes=2 * (adapter_bytes or 10 ** 9) + 1)
        manager = engine.memory
        rows = []
        manager.listeners.append(rows.append)
        results[policy] = serve(engine, requests())
        one = manager.objects[f"adapter:{paths[0]}"]
        if policy == "infinite":
            # Resident from the start: each adapter installed once, when first named; no load.
            assert sum(r.op == "preload" for r in rows) == 4
            assert not any(r.op == "load" for r in rows)
        else:
            assert all(len(manager.resident) <= 2 for _ in [0])
            assert sum(r.op in ("evict", "drop") for r in rows) >= 1, policy
        manager.check()
        manager.close()
    texts = {p: {a: t for a, (t, _) in r.items()} for p, r in results.items()}
    assert texts["lru"] == texts["infinite"] == texts["scalesim"] == texts["none"]
    assert len(set(texts["infinite"].values())) > 1  # the adapters do change the outputs


def test_an_adapter_larger_than_the_device_fails_the_request(hf, tmp_path) -> None:
    engine = make_engine(hf, "lru", device_bytes=1000)
    manager = engine.memory
    path = random_adapter(tmp_path / "big", engine.executor.config)
    engine.submit(Request("big", "Hi", sampling=SamplingParams(max_tokens=2), adapter=path))
    done = []
    while engine.has_work():
        done += engine.step().finished
    assert len(done) == 1 and "device budget" in done[0].error
    manager.close()
