"""Checks of everything a run configuration names on disk, made before the model loads.

Loading a model takes long; a missing file found after it wastes that time and, found by the
engine, fails each call that needs it instead of the run. :func:`check_config` looks at every
path a configuration names: ``runtime.model`` when it is a path, ``runtime.memory.belady_trace``
and ``runtime.memory.disk_dir`` (its nearest existing parent must be writable), and every LoRA
adapter the world declares (:meth:`scalesim.World.adapters`): its ``adapter_config.json``
against the engine's limits and its ``adapter_model.safetensors`` header against the model's
shapes, read without loading a tensor. :func:`check_run_dir` checks that the run directory can be
written. A problem raises :class:`~scalesim.config.ConfigError`: one line naming the key or file.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable

from scalesim.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from runtime.interface import EngineInterface
    from runtime.model.profiles import ModelConfig
    from scalesim.world import World

# The safetensors header is a little-endian u64 length and that many bytes of JSON; a larger
# length than this is a corrupt file rather than a header.
_MAX_HEADER = 100 * 2**20


def _fail(config: RunConfig, problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        key, _, message = problems[0].partition(": ")
        raise ConfigError.at(config.source, key, f"{message}{more}")


def writable_dir_problem(path: Path) -> str | None:
    """Why files cannot be created at ``path`` (which need not exist yet), or None.

    The nearest existing directory on the way up must take a new file: tried for real, since
    permission bits say nothing for root and nothing about a read-only mount.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".scalesim-check-"):
            pass
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or exc})"
    return None


def check_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Raise :class:`ConfigError` unless the run directory ``run_dir`` can be written."""
    problem = writable_dir_problem(run_dir)
    key = "output.dir" if config.output.dir else "run directory"
    _fail(config, [f"{key} {run_dir}: {problem}"] if problem else [])


def check_config(config: RunConfig, world_class: type[World], *,
                 engine: EngineInterface | None = None, needs_belady_trace: bool = True) -> None:
    """Raise :class:`ConfigError` for the first problem with a path the configuration names.

    ``engine``: the run's already built engine (its model is then the one adapters are checked
    against, and ``runtime.model`` is not looked up). ``needs_belady_trace=False`` when the
    belady call order comes from elsewhere than ``runtime.memory.belady_trace``.
    """
    problems: list[str] = []
    rt, mem = config.runtime, config.runtime.memory
    if engine is None:
        problems += _model_problems(rt.model, rt.executor, rt.random_weights)
    if mem.belady_trace:
        path = Path(mem.belady_trace)
        trace = path / "trace.parquet" if path.is_dir() else path
        if not trace.is_file():
            problems.append(f"runtime.memory.belady_trace: no trace at {trace}")
    elif needs_belady_trace and mem.policy == "belady":
        problems.append("runtime.memory.belady_trace: policy belady needs the run directory of "
                        "an earlier run of the same seed")
    for key, value in (("disk_dir", mem.disk_dir), ("kv_store", mem.kv_store)):
        if value and rt.executor != "modeled":  # a modeled run touches no directory
            problem = writable_dir_problem(Path(value).expanduser())
            if problem:
                problems.append(f"runtime.memory.{key} {value}: {problem}")
    _fail(config, problems)
    adapters = declared_adapters(config, world_class)
    if adapters and rt.executor != "modeled":  # the modeled executor reads no adapter files
        model = model_architecture(rt.model, engine)
        max_rank = rt.max_lora_rank if rt.executor == "torch" else None
        for adapter in adapters:
            problems += [f"adapter {adapter} (declared by {world_class.__name__}.adapters): {p}"
                         for p in adapter_problems(Path(adapter), model, max_rank,
                                                   strict=rt.executor == "torch")]
    _fail(config, problems)


def _model_problems(model: str, executor: str, random_weights: bool = False) -> list[str]:
    """``runtime.model`` that names a path that is not there (names are the loader's business),
    or, for random weights, no built-in profile."""
    from runtime.model.loader import BUILTIN_GGUF
    from runtime.model.profiles import PROFILES

    if random_weights:
        return [] if model in PROFILES else [
            f"runtime.model: random weights need a built-in profile ({', '.join(PROFILES)}); "
            f"got {model!r}"]
    if model in BUILTIN_GGUF or (executor == "modeled" and model in PROFILES):
        return []
    path = Path(model).expanduser()
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [
            f"runtime.model: {model}: the directory has no config.json"]
    if path.suffix == ".gguf":
        return [] if path.is_file() else [f"runtime.model: {model}: no such file"]
    if executor == "modeled":
        return []  # the engine names the profiles it knows
    return [f"runtime.model: {model!r} is not a built-in name ({', '.join(BUILTIN_GGUF)}), "
            "a local model directory or a .gguf file"]


def declared_adapters(config: RunConfig, world_class: type[World]) -> list[str]:
    """The adapter paths ``world_class`` declares for the run's ``world.params``, once each."""
    defaults = {name: p.default for name, p in world_class.parameters().items()
                if p.default is not p.empty}
    try:
        declared: Iterable[str] = world_class.adapters(**{**defaults, **config.world.params})
        return list(dict.fromkeys(str(path) for path in declared))
    except Exception as exc:  # the world's own code: whatever it raises is a problem of params
        raise ConfigError.at(config.source, "world.params",
                             f"{world_class.__name__}.adapters failed: {type(exc).__name__}: "
                             f"{exc}") from None


def model_architecture(model: str, engine: EngineInterface | None = None) -> ModelConfig | None:
    """The shapes of the run's model where known without loading it; None where not."""
    from runtime.model.profiles import PROFILES, from_hf_config

    if engine is not None:
        return engine.architecture()
    if model in PROFILES:
        return PROFILES[model]
    config_file = Path(model).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return from_hf_config(SimpleNamespace(**json.loads(config_file.read_text())))
        except (ValueError, AttributeError, TypeError):
            return None  # not a Llama-family config we can read: the loader will say
    return None  # a .gguf file: its shapes are known only once it is converted


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets).

    Raises ValueError when the file is not a whole safetensors file: a garbled header, or data
    that ends before the header says it should (a truncated copy).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError("not a safetensors file (its header length is impossible)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a table)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(f"truncated: {size} bytes, the header needs {8 + length + end}")
    return tensors


def adapter_problems(path: Path, model: ModelConfig | None, max_rank: int | None,
                     strict: bool = True) -> list[str]:
    """What is wrong with the PEFT adapter directory ``path`` for ``model`` (empty: nothing).

    ``max_rank``: the engine's largest rank, if it has one. ``strict``: the torch engine's
    limits (q/k/v/o/gate/up/down only; no DoRA, patterns or saved modules), which the
    transformers baseline's peft does not have. ``model=None`` skips the shape checks.
    """
    from runtime.lora import TARGETS, lora_tensor_target, module_shapes
    from runtime.model.profiles import PROFILES

    if not path.is_dir():
        return ["no such directory" if not path.exists() else "not a directory"]
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return ["no adapter_config.json there"]
    try:
        peft = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"adapter_config.json is not JSON: {exc}"]
    if not isinstance(peft, dict):
        return ["adapter_config.json is not a JSON object"]
    problems: list[str] = []
    if peft.get("peft_type", "LORA") != "LORA":
        problems.append(f"adapter_config.json: peft_type {peft.get('peft_type')!r} is not LORA")
    try:
        rank = int(peft.get("r", 8))
    except (TypeError, ValueError):
        return problems + [f"adapter_config.json: r={peft.get('r')!r} is not a number"]
    if max_rank is not None and rank > max_rank:
        problems.append(f"adapter_config.json: r={rank} exceeds runtime.max_lora_rank {max_rank}")
    targets = peft.get("target_modules")
    if strict:
        for key in ("use_dora", "fan_in_fan_out"):
            if peft.get(key):
                problems.append(f"adapter_config.json: {key}={peft[key]} is not supported")
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
            if peft.get(key):
                problems.append(f"adapter_config.json: {key} is not supported")
        if isinstance(targets, list):
            unknown = sorted(set(map(str, targets)) - set(TARGETS))
            if unknown:
                problems.append(f"adapter_config.json: target_modules {unknown} are not among "
                                f"{', '.join(TARGETS)}")
    base = peft.get("base_model_name_or_path")
    if model is not None and isinstance(base, str) and base in PROFILES:
        other = PROFILES[base]
        shape = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")
        if any(getattr(other, k) != getattr(model, k) for k in shape):
            problems.append(f"adapter_config.json: base_model_name_or_path {base!r} is another "
                            "architecture than the run's model")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return problems + ["no adapter_model.safetensors there"]
    try:
        tensors = safetensors_header(weights)
    except (OSError, ValueError) as exc:
        return problems + [f"adapter_model.safetensors: {exc}"]
    if not tensors:
        return problems + ["adapter_model.safetensors holds no tensors"]
    if model is None:
        return problems
    shapes = module_shapes(model)
    for name, info in tensors.items():
        where = lora_tensor_target(name)
        if where is None:
            if strict:
                problems.append(f"adapter_model.safetensors: unexpected tensor {name!r}")
            continue
        layer, module, which = where
        if module not in shapes or which not in ("lora_A", "lora_B"):
            if strict:
                problems.append(f"adapter_model.safetensors: tensor {name!r} targets an "
                                "unsupported module")
            continue
        if layer >= model.num_layers:
            problems.append(f"adapter_model.safetensors: layer {layer} but the model has "
                            f"{model.num_layers} (adapter for another model?)")
            break
        fan_in, fan_out = shapes[module]
        expected = [rank, fan_in] if which == "lora_A" else [fan_out, rank]
        if list(info.get("shape", [])) != expected:
            problems.append(f"adapter_model.safetensors: {name} has shape {info.get('shape')}, "
                            f"the model needs {expected} (adapter for another model?)")
            break
    return problems
