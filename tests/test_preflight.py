"""Preflight: every path a configuration names is checked before the model loads.

Each bad case runs :func:`scalesim.simulate` with engine building replaced by a function that
fails the test, so a passing case proves the problem was found before any model was loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import scalesim
from experiments.make_adapters import make_adapters
from runtime.model.profiles import PROFILES, profile
from scalesim import simulation
from scalesim.config import ConfigError
from scalesim.preflight import adapter_problems, safetensors_header

ROOT = Path(__file__).resolve().parents[1]
SMOL = PROFILES["smollm2-135m"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A directory of two valid rank-4 adapters for SmolLM2-135M."""
    out = tmp_path_factory.mktemp("adapters")
    make_adapters(out, SMOL, n=2, rank=4)
    return out


@pytest.fixture
def adapters(good, tmp_path) -> Path:
    """A fresh copy of ``good`` that a test may break."""
    return Path(shutil.copytree(good, tmp_path / "adapters"))


class ModelLoaded(Exception):
    """Raised instead of building an engine: reaching it means every preflight check passed."""


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("an engine was built: the checks passed")

    monkeypatch.setattr(simulation, "assemble_engine", refuse)


def config(adapter_dir: Path | str, executor: str = "torch", world: str = "Adapted",
           memory: dict | None = None, **params) -> dict:
    return {"world": {"class": f"tests.fault_worlds:{world}",
                      "params": {"adapter_dir": str(adapter_dir), **params}},
            "runtime": {"executor": executor, "max_lora_rank": 8, "memory": memory or {}},
            "sim": {"until": 10}}


def problem(tmp_path: Path, cfg: dict, out: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        scalesim.simulate(cfg, out=out or tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message
    assert not (tmp_path / "run").exists()  # nothing is written for a configuration error
    return message


def passes(tmp_path: Path, cfg: dict) -> None:
    with pytest.raises(ModelLoaded):
        scalesim.simulate(cfg, out=tmp_path / "run")


def test_good_adapters_pass(tmp_path, adapters):
    passes(tmp_path, config(adapters))
    passes(tmp_path, config(adapters, executor="hf"))


def test_a_missing_adapter_directory_is_named(tmp_path):
    message = problem(tmp_path, config(tmp_path / "nowhere"))
    assert f"adapter {tmp_path / 'nowhere' / 'adapter-000'} (declared by Adapted.adapters): " \
           "no such directory (+1 more)" in message


def test_missing_weights_are_named(tmp_path, adapters):
    # The case of the issue: the directory is there, adapter_model.safetensors is not.
    for weights in adapters.glob("*/adapter_model.safetensors"):
        weights.unlink()
    message = problem(tmp_path, config(adapters))
    assert "adapter-000" in message and "no adapter_model.safetensors there" in message


def test_a_world_whose_declaration_fails_names_its_params(tmp_path):
    # A world that lists its adapter directory: the FileNotFoundError of the issue, but now
    # before the model loads, naming the key.
    message = problem(tmp_path, config(tmp_path / "gone", world="Listed"))
    assert "world.params: Listed.adapters failed: FileNotFoundError" in message
    assert str(tmp_path / "gone") in message


def test_rank_above_the_torch_limit(tmp_path):
    make_adapters(tmp_path / "r16", SMOL, n=2, rank=16)
    message = problem(tmp_path, config(tmp_path / "r16"))
    assert "r=16 exceeds runtime.max_lora_rank 8" in message
    passes(tmp_path, config(tmp_path / "r16", executor="hf"))  # peft takes any rank


def test_an_adapter_for_another_model(tmp_path):
    qwen = profile("qwen2.5-0.5b", num_layers=2)
    make_adapters(tmp_path / "named", qwen, n=2, rank=4, base_model="qwen2.5-0.5b")
    assert "base_model_name_or_path 'qwen2.5-0.5b' is another architecture" in problem(
        tmp_path, config(tmp_path / "named"))
    # Claiming the right base does not help: the tensor shapes are checked.
    make_adapters(tmp_path / "lying", qwen, n=2, rank=4, base_model="smollm2-135m")
    message = problem(tmp_path, config(tmp_path / "lying", executor="hf"))
    assert "the model needs" in message and "adapter for another model?" in message


def test_unsupported_modules_and_broken_configs(tmp_path, adapters):
    cfg_file = adapters / "adapter-000" / "adapter_config.json"
    peft = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**peft, "target_modules": ["q_proj", "lm_head"]}))
    assert "target_modules ['lm_head'] are not among" in problem(tmp_path, config(adapters))
    cfg_file.write_text("{not json")
    assert "adapter_config.json is not JSON" in problem(tmp_path, config(adapters))


@pytest.mark.parametrize("damage, expected", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: b"garbage", "too short"),
    (lambda data: b"\xff" * 64, "header length is impossible"),
    (lambda data: data[:8] + b"!" + data[9:], "header is not JSON"),
])
def test_damaged_weights(tmp_path, adapters, damage, expected):
    weights = adapters / "adapter-001" / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    message = problem(tmp_path, config(adapters))
    assert "adapter-001" in message and expected in message


def test_the_header_reader_agrees_with_safetensors(good):
    from safetensors import safe_open

    weights = good / "adapter-000" / "adapter_model.safetensors"
    header = safetensors_header(weights)
    with safe_open(str(weights), framework="pt") as f:
        assert set(header) == set(f.keys())
        assert all(list(f.get_slice(k).get_shape()) == header[k]["shape"] for k in header)
    assert adapter_problems(good / "adapter-000", SMOL, max_rank=8) == []


def test_undeclared_adapters_and_the_modeled_executor_are_not_checked(tmp_path):
    passes(tmp_path, config(tmp_path / "nowhere", declare=False))
    passes(tmp_path, config(tmp_path / "nowhere", executor="modeled"))  # reads no adapter files


def test_memory_paths(tmp_path, adapters):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "runtime.memory.belady_trace: no trace at" in problem(
        tmp_path, config(adapters, memory={"policy": "lru", "belady_trace": str(tmp_path)}))
    assert "runtime.memory.belady_trace: policy belady needs" in problem(
        tmp_path, config(adapters, memory={"policy": "belady"}))
    message = problem(tmp_path, config(adapters, memory={"disk_dir": str(blocker / "cache")}))
    assert f"runtime.memory.disk_dir {blocker / 'cache'}: {blocker} is a file" in message
    passes(tmp_path, config(adapters, memory={"disk_dir": str(tmp_path / "new" / "cache")}))


def test_the_run_directory_must_be_writable(tmp_path, adapters):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = problem(tmp_path, config(adapters), out=blocker / "run")
    assert f"run directory {blocker / 'run'}: {blocker} is a file, not a directory" in message
    # /proc takes no new files, even from root (permission bits would not show that).
    message = problem(tmp_path, {**config(adapters), "output": {"dir": "/proc/scalesim/run"}},
                      out=Path("/proc/scalesim/run"))
    assert "output.dir /proc/scalesim/run: cannot create files in /proc" in message


def test_model_paths(tmp_path, adapters):
    cfg = config(adapters)
    cfg["runtime"]["model"] = str(tmp_path / "no-model")
    assert "runtime.model:" in problem(tmp_path, cfg)
    (tmp_path / "empty-model").mkdir()
    cfg["runtime"]["model"] = str(tmp_path / "empty-model")
    assert "the directory has no config.json" in problem(tmp_path, cfg)


def test_the_cli_exits_2_with_one_line(tmp_path):
    world = tmp_path / "world.yaml"
    world.write_text(f"world: {{class: tests.fault_worlds:Adapted, params: "
                     f"{{adapter_dir: {tmp_path / 'nowhere'}}}}}\n")
    done = subprocess.run([sys.executable, "-m", "scalesim.run", str(world), "--out",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "world.yaml" in lines[0] and "adapter-000" in lines[0]
    assert not (tmp_path / "run").exists()
