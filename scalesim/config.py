"""The schema of ``world.yaml``, and one-line errors for everything wrong in it.

A run file has five sections (only ``world`` is required)::

    world:   {class: worlds.town:Town, params: {villagers: 8}}
    runtime: {executor: hf, model: smollm2-135m, device: cpu, dtype: float32}
    sim:     {until: 1320, seed: 0}
    run:     {max_failed_fraction: 0.5, fail_fast: false}
    output:  {dir: runs/town, progress: true}

:func:`load_config` reads the file, applies ``--set dotted.key=value`` overrides and validates it.
Any problem (unknown key, wrong type, missing file, class that cannot be imported, parameter the
world does not take) raises :class:`ConfigError` whose message is one line naming the key and file.
"""

from __future__ import annotations

import copy
import importlib
import re
import importlib.util
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError,
                      field_validator, model_validator)

if TYPE_CHECKING:  # for annotations only: scalesim.world is imported when a world is loaded
    from scalesim.world import World

#: The kinds of agent memory the modeled executor can manage.
ManagedKind = Literal["adapter", "prefix_kv"]
MANAGED_KINDS: tuple[ManagedKind, ...] = ("adapter", "prefix_kv")


class ConfigError(ValueError):
    """A run configuration is invalid; the message is one line for the user."""

    @classmethod
    def at(cls, source: Path | None, key: str, message: str) -> "ConfigError":
        """The error for ``key`` (dotted, e.g. ``runtime.model``) of the configuration read
        from ``source`` (``None``: built in Python)."""
        where = f" in {source}" if source else ""
        return cls(f"config error{where}: {key}: {message}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class WorldConfig(_Section):
    cls: str = Field(alias="class", description="the World subclass, as 'module:Class'")
    params: dict[str, Any] = Field(default_factory=dict)


class MemoryConfig(_Section):
    """``runtime.memory``: where agent memory objects live and how they move (torch executor)."""

    policy: Literal["scalesim", "lru", "lfu", "fifo", "belady", "infinite", "unlimited",
                    "none"] = "scalesim"
    # Sizes take plain byte counts or units: 2GB, 512MiB.
    device_bytes: ByteSize | None = Field(default=None, ge=1,
                                          description="device budget; none: no limit")
    host_bytes: ByteSize | None = Field(default=None, ge=0, description="host budget; none: no limit")
    disk_dir: str | None = Field(default=None, description="cache dir of the disk tier")
    kv_store: str | None = Field(default=None, description="persistent persona-KV store dir")
    kv_store_bytes: ByteSize | None = Field(default=None, ge=1,
                                            description="store cap; none: no cap")
    link_gbps: float | None = Field(default=None, gt=0, description="emulated host-device link")
    link_latency_us: float = Field(default=0.0, ge=0)
    lookahead: int = Field(default=16, ge=0, description="nearest agents a prefetch considers")
    edge_delay: float = Field(default=0.0, ge=0, description="sim time a message takes to cause a call")
    belady_trace: str | None = Field(default=None, description="run dir of an earlier run (belady)")
    declare_agents: bool = Field(default=True, description="register every agent's memory "
                                 "objects at the start, so first calls can be prefetched")


class ModeledConfig(_Section):
    """``runtime.modeled``: the cost-model backend (no tensors; every time it reports is modeled).

    ``runtime.model`` names the model profile (``runtime.model.profiles``); ``runtime.memory``
    gives the policy and the agent-memory budget (``device_bytes``) as for the torch executor.
    """

    hardware: str = Field(default="H100", description="hardware profile (runtime.cost_model)")
    lora_rank: int = Field(default=0, ge=0, description="rank of each agent's adapter; 0: none")
    managed: list[ManagedKind] = Field(
        default_factory=lambda: list(MANAGED_KINDS), description="agent memory kinds")
    prefix_tokens: int | None = Field(default=None, ge=1, description="fixed persona length")
    output_tokens: int = Field(default=32, ge=1, description="tokens each call generates")
    chars_per_token: float = Field(default=4.0, gt=0)
    preempt_prefetch: bool = Field(default=True, description="urgent loads abort prefetches")
    replies: list[str] | dict[str, list[str]] = Field(
        default_factory=lambda: ["ok"], min_length=1,
        description="placeholder answers, cycled per request; or a mapping from a regular "
        "expression searched in the prompt to its answers (the last for prompts none matches)")

    @field_validator("replies")
    @classmethod
    def _replies_compile(cls, replies: list[str] | dict[str, list[str]]
                         ) -> list[str] | dict[str, list[str]]:
        if isinstance(replies, dict):
            for pattern, answers in replies.items():
                if not answers:
                    raise ValueError(f"the answers to {pattern!r} are empty")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return replies

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, name: str) -> str:
        from runtime.cost_model import HARDWARE

        if name not in HARDWARE:
            raise ValueError(f"unknown hardware profile {name!r}; built-in: {', '.join(HARDWARE)}")
        return name


class RayConfig(_Section):
    """``runtime.ray``: where the replica actors of ``runtime.cluster: ray`` run."""

    address: str | None = Field(default=None, description="an existing cluster ('auto', "
                                "'ray://host:10001'); none: start a local Ray instance")
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    num_gpus_per_replica: float = Field(default=0.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class RuntimeConfig(_Section):
    executor: Literal["hf", "torch", "modeled"] = "hf"
    # Engine replicas (runtime/replicas.py): each its own engine, memory manager and budgets.
    replicas: int = Field(default=1, ge=1, description="engine replicas; agents have a home one")
    cluster: Literal["local", "ray"] = Field(default="local", description="where replicas run")
    on_replica_failure: Literal["fail", "continue"] = "fail"
    ray: RayConfig = Field(default_factory=RayConfig)
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Options of the torch executor (ignored by hf).
    block_size: int = Field(default=16, ge=1, description="tokens per KV block")
    kv_cache_tokens: int = Field(default=32768, ge=1, description="KV pool size in tokens")
    max_num_seqs: int = Field(default=64, ge=1, description="sequences running at once")
    max_batch_tokens: int = Field(default=512, ge=1, description="tokens per engine iteration")
    shared_prefill: int = Field(
        default=0, ge=0, description="prompt tokens one sequence computes in an iteration that "
        "others need (0: up to max_batch_tokens); smaller lets short requests in and keeps "
        "their replies quick beside long prompts")
    max_lora_rank: int = Field(default=16, ge=1, description="largest LoRA rank accepted")
    attention: Literal["auto", "torch", "cpu", "flashinfer"] = "auto"
    random_weights: bool = Field(
        default=False, description="the built-in profile runtime.model with random weights: no "
        "model files, text served as bytes (shape runs, e.g. a 7B profile on a GPU)")
    quantization: Literal["none", "int8", "int4", "int8x8", "int4x8"] = Field(
        default="none", description="int8 or int4 weights (CPU); int8x8 / int4x8 also quantize "
        "activations to int8 per block of 32 (compiled kernels), see runtime/model/weights.py")
    threads: int = Field(default=0, ge=0, description="CPU threads of the torch engine "
                         "(0: the cores this process may use)")
    quantized_dense_from: int = Field(
        default=16, ge=0, description="steps of this many tokens or more use a dense bfloat16 "
        "copy of quantized weights (0: keep no copy)")
    kv_cache_dtype: Literal["auto", "int8"] = Field(
        default="auto", description="how the KV pool stores keys and values: the model's dtype "
        "(auto) or int8 rows with a scale each (about half of bfloat16's bytes, CPU; see "
        "runtime/kv_cache.py)")
    prefix_cache: Literal["tokens", "persona"] = Field(
        default="tokens", description="what the prefix cache keeps: every computed prefix "
        "(tokens) or only each agent's persona (persona: the reuse before token-level caching)")
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    modeled: ModeledConfig = Field(default_factory=ModeledConfig)

    @model_validator(mode="after")
    def _quantization_runs(self) -> "RuntimeConfig":
        if self.quantization != "none" and self.executor == "torch" and self.dtype == "float16":
            raise ValueError(f"quantization {self.quantization} needs dtype float32 or bfloat16")
        if self.random_weights and self.executor != "torch":
            raise ValueError(f"random_weights needs executor torch, not {self.executor}")
        if self.kv_cache_dtype != "auto" and self.executor != "torch":
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} needs executor torch, "
                             f"not {self.executor}")
        on_cpu = self.device.split(":")[0] == "cpu"
        if self.kv_cache_dtype != "auto" and (not on_cpu or self.dtype == "float16"):
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} needs device cpu and dtype "
                             f"float32 or bfloat16, not {self.device} / {self.dtype}")
        return self

    def engine_options(self) -> dict[str, Any]:
        """Executor-specific keyword arguments for :func:`runtime.build_engine` (the memory
        keywords come from :attr:`memory`)."""
        if self.executor == "modeled":
            m = self.modeled
            options: dict[str, Any] = {
                "hardware_profile": m.hardware, "lora_rank": m.lora_rank,
                "managed": tuple(m.managed), "prefix_tokens": m.prefix_tokens,
                "output_tokens": m.output_tokens, "chars_per_token": m.chars_per_token,
                "preempt_prefetch": m.preempt_prefetch, "replies": (dict(m.replies) if isinstance(m.replies, dict)
                                                      else tuple(m.replies)),
                "block_size": self.block_size, "prefix_cache": self.prefix_cache,
                "max_num_seqs": self.max_num_seqs, "max_batch_tokens": self.max_batch_tokens,
                "shared_prefill": self.shared_prefill}
            if "kv_cache_tokens" in self.model_fields_set:  # else sized from the profile
                options["kv_cache_tokens"] = self.kv_cache_tokens
            return options
        if self.executor != "torch":
            return {}
        return {"block_size": self.block_size, "kv_cache_tokens": self.kv_cache_tokens,
                "max_num_seqs": self.max_num_seqs, "max_batch_tokens": self.max_batch_tokens,
                "shared_prefill": self.shared_prefill,
                "max_lora_rank": self.max_lora_rank, "attention": self.attention,
                "prefix_cache": self.prefix_cache, "random_weights": self.random_weights,
                "quantization": self.quantization,
                "quantized_dense_from": self.quantized_dense_from, "threads": self.threads or None,
                "kv_cache_dtype": self.kv_cache_dtype}


class SimConfig(_Section):
    until: float | None = Field(default=None, gt=0)
    seed: int = 0
    call_duration: float = Field(
        default=0.0, ge=0, allow_inf_nan=False,
        description="simulated time an LLM call takes unless it names its own duration: the "
                    "agent resumes that long after it asked (0: at once)")


class FailurePolicy(_Section):
    """``run``: when a run whose clock went to its end still counts as failed.

    Failed calls are counted over all finished calls when the run ends; above
    ``max_failed_fraction`` the run's status is ``failed`` (exit 1). ``fail_fast`` stops the run at
    the first failed call instead.
    """

    max_failed_fraction: float = Field(default=0.5, ge=0, le=1,
                                       description="largest share of failed calls that passes")
    fail_fast: bool = Field(default=False, description="stop at the first failed call")


class ReplayConfig(_Section):
    """``replay``: answer calls from an earlier run's record (scalesim/replay.py).

    ``mode: resume`` (``--resume RUN_DIR``) replays while every call matches, then goes live;
    ``mode: cache`` answers any call that matches a recorded one of its agent.
    """

    run: str | None = Field(default=None, description="the earlier run's directory")
    mode: Literal["resume", "cache"] = "resume"


class OutputConfig(_Section):
    dir: str | None = None
    progress: bool = True
    progress_every: float = Field(default=30.0, gt=0, description="seconds between plain "
                                  "progress lines when stderr is not a terminal")
    # The trace reaches the disk in parts as the run goes, so a killed run keeps its calls.
    flush_calls: int = Field(default=1000, ge=1, description="flush after this many new calls")
    flush_seconds: float = Field(default=10.0, gt=0,
                                 description="flush new rows at least this often (wall seconds)")


class RunConfig(_Section):
    world: WorldConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    run: FailurePolicy = Field(default_factory=FailurePolicy)
    output: OutputConfig = Field(default_factory=OutputConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    #: The YAML file this came from (``None`` when built in Python).
    source: Path | None = Field(default=None, exclude=True)

    def echo(self) -> dict[str, Any]:
        """The configuration as plain data, for ``summary.json``."""
        return self.model_dump(mode="json", by_alias=True)


class ServeConfig(_Section):
    """``serve``: the OpenAI-compatible server (``python -m scalesim.serve``)."""

    host: str = Field(default="127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    served_model_name: str | None = Field(default=None, description="model id; default "
                                          "runtime.model")
    adapters: str | None = Field(default=None, description="directory of PEFT adapter dirs")
    api_key: str | None = Field(default=None, description="required bearer token, if set")
    max_pending: int = Field(default=256, ge=1, description="queued + running before 429")
    default_max_tokens: int = Field(default=256, ge=1, description="when a request sets none")
    max_tokens_cap: int | None = Field(default=None, ge=1, description="the most output tokens "
                                       "any request gets, whatever it asks (none: the context)")
    trace: str | None = Field(default=None, description="run directory for the trace")
    pace: float = Field(default=0.0, ge=0, description="modeled executor: wall seconds per "
                        "modeled second (0: as fast as possible)")
    drain_timeout_s: float = Field(default=60.0, gt=0, description="SIGTERM: wait this long")
    stream_estimator: bool = Field(default=True, description="agents without a client's hint "
                                   "are ordered by next calls learned from the request stream "
                                   "(scalesim.serve.stream_estimator); false: by recency")
    default_temperature: float = Field(
        default=0.0, ge=0, le=2, description="when a request sets none (0: greedy; OpenAI's "
        "own default is 1)")
    tool_choice_auto: Literal["auto", "required"] = Field(
        default="auto", description="what a chat request with tools and tool_choice 'auto' (or "
        "none) gets: 'auto' free text with calls parsed out; 'required' one call of one of its "
        "tools, as if it sent tool_choice 'required', unless its last message is a tool result "
        "(then free text, so that a client's tool loop ends)")
    choice_prompts: list[str] = Field(
        default_factory=list, description="regular expressions searched in the prompt (a chat "
        "request's last user message) of a request with no constraint and no tools; the first "
        "that matches constrains the reply to one of the lines of its group 'options' (as "
        "guided_choice), for clients that ask for an exact option in the prompt alone")

    @field_validator("choice_prompts")
    @classmethod
    def _choice_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"choice_prompts: {pattern!r} is not a regular expression: "
                                 f"{exc}") from None
            if "options" not in compiled.groupindex:
                raise ValueError(f"choice_prompts: {pattern!r} has no group named 'options' "
                                 "(write (?P<options>...) around the lines of options)")
        return patterns


class ServeRunConfig(_Section):
    """A serve file: ``runtime`` and ``serve`` (a world's sections are allowed and unused)."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    world: WorldConfig | None = None
    sim: SimConfig = Field(default_factory=SimConfig)
    run: FailurePolicy = Field(default_factory=FailurePolicy)
    output: OutputConfig = Field(default_factory=OutputConfig)
    source: Path | None = Field(default=None, exclude=True)

    def echo(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", by_alias=True, include={"runtime", "serve"})
        if data["serve"].get("api_key"):
            data["serve"]["api_key"] = "***"
        return data


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty file: ``{}``); a one-line ConfigError else."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError(f"config error in {path}{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping")
    return data


def load_serve_config(source: str | Path | dict[str, Any] | None,
                      overrides: dict[str, Any] | None = None) -> ServeRunConfig:
    """Read, override and validate a serve configuration (``None``: the defaults)."""
    path = None
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        data = read_yaml(path)
    data = apply_overrides(data, overrides or {})
    runtime = data.setdefault("runtime", {})
    if isinstance(runtime, dict):
        runtime.setdefault("executor", "torch")  # a server drives the paged engine by default
    try:
        config = ServeRunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, path)) from None
    config.source = path
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML (numbers, booleans, lists...)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the dotted keys of ``overrides`` set, in a copy (``data``, perhaps the
    caller's own dict, is left as it was)."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _validation_message(exc: ValidationError, source: Path | None) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        what = "unknown key"
    elif err["type"] == "missing":
        what = "required key is missing"
    else:
        what = err["msg"]
        if "input" in err and not isinstance(err["input"], (dict, list)):
            what += f" (got {err['input']!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return str(ConfigError.at(source, key, f"{what}{more}"))


def load_config(
    source: str | Path | dict[str, Any] | RunConfig,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Read, override and validate a run configuration."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        data, path = source.echo(), source.source
    elif isinstance(source, dict):
        data, path = dict(source), None
    else:
        path = Path(source)
        data = read_yaml(path)
    data = apply_overrides(data, overrides or {})
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, path)) from None
    config.source = path
    return config


def import_world_class(config: RunConfig) -> type[World]:
    """Import ``world.class``; a module next to the YAML file is found too."""
    from scalesim.world import World

    source = config.source
    module_name, sep, class_name = config.world.cls.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError.at(source, "world.class",
                             f"expected 'module:Class', got {config.world.cls!r}")
    if config.source is not None:
        for base in (config.source.parent, config.source.parent.parent):
            if str(base.resolve()) not in sys.path:
                sys.path.append(str(base.resolve()))
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise ConfigError.at(source, "world.class",
                             f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, World)):
        raise ConfigError.at(source, "world.class",
                             f"{module_name} has no World subclass named {class_name!r}")
    accepted = cls.parameters()
    for name in config.world.params:
        if name not in accepted:
            raise ConfigError.at(source, f"world.params.{name}", f"{cls.__name__}.setup takes "
                                 f"no such parameter (it takes: {', '.join(accepted) or 'none'})")
    for name, param in accepted.items():
        if param.default is param.empty and name not in config.world.params:
            raise ConfigError.at(source, f"world.params.{name}", "required parameter is missing")
    _check_param_types(cls, config)
    return cls


def _check_param_types(cls: type[World], config: RunConfig) -> None:
    """Validate ``world.params`` against the type hints of ``setup``, converting in place."""
    try:
        hints = typing.get_type_hints(cls.setup)
    except Exception:  # hints that cannot be resolved are the world author's documentation only
        return
    for name, value in config.world.params.items():
        if name not in hints:
            continue
        try:
            config.world.params[name] = TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as exc:
            raise ConfigError.at(config.source, f"world.params.{name}",
                                 f"{exc.errors()[0]['msg']} (got {value!r})") from None
