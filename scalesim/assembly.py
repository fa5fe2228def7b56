"""From a ``runtime:`` section to an engine: the one assembly every front end uses.

``python -m scalesim.run``, :func:`scalesim.simulate`, ``python -m scalesim.serve`` and the
experiments all turn their validated :class:`~scalesim.config.RuntimeConfig` into an engine
here, so the same section always gives the same engine: the same executor options, memory
tiers, persistent store and replicas. :func:`engine_settings` is that translation, as the
keywords of :func:`runtime.build_engine`; :func:`assemble_engine` builds from it one
:class:`runtime.Engine`, or a :class:`runtime.replicas.ReplicaSet` when ``runtime.replicas`` is
more than one or ``runtime.cluster`` is ``ray``. Either way the result is an
:class:`~runtime.interface.EngineInterface`, and nothing else of it is the front end's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.interface import EngineInterface
from runtime.memory import DistanceSource, Policy
from scalesim.config import ConfigError, RuntimeConfig


def engine_settings(runtime: RuntimeConfig, policy: Policy | None = None) -> dict[str, Any]:
    """The keywords of :func:`runtime.build_engine` that ``runtime`` describes (the memory
    ones from ``runtime.memory``; ``policy`` replaces the named policy by an object)."""
    mem = runtime.memory
    return {"model": runtime.model, "device": runtime.device, "dtype": runtime.dtype,
            "policy": policy or mem.policy, "device_bytes": mem.device_bytes,
            "host_bytes": mem.host_bytes, "disk_dir": mem.disk_dir, "kv_store": mem.kv_store,
            "kv_store_bytes": mem.kv_store_bytes, "link_gbps": mem.link_gbps,
            "link_latency_us": mem.link_latency_us, "lookahead": mem.lookahead,
            **runtime.engine_options()}


def assemble_engine(runtime: RuntimeConfig, *, source: Path | None = None,
                    policy: Policy | None = None, distance: DistanceSource | None = None,
                    **options: Any) -> EngineInterface:
    """The engine ``runtime`` describes (see the module docstring).

    ``source`` is the file the section came from (for error messages); ``distance`` the source
    the memory manager reads from the start (a front end may also call
    :meth:`~runtime.interface.EngineInterface.use_distance` later); ``options`` add executor
    keywords, e.g. an already loaded ``hf_model`` and ``tokenizer``. A model that cannot be
    found raises :class:`~scalesim.config.ConfigError` naming ``runtime.model``.
    """
    from runtime import build_engine
    from runtime.model.loader import ModelNotFoundError

    if runtime.executor == "modeled":
        from runtime.model.profiles import PROFILES

        if runtime.model not in PROFILES:
            raise ConfigError.at(source, "runtime.model", "the modeled executor needs a model "
                                 f"profile, one of {', '.join(PROFILES)}; got {runtime.model!r}")
    keywords = {**engine_settings(runtime, policy), **options}
    try:
        if runtime.replicas > 1 or runtime.cluster == "ray":
            engine = _replica_set(runtime, keywords, source)
            if distance is not None:
                engine.use_distance(distance)
            return engine
        return build_engine(runtime.executor, distance=distance, **keywords)
    except ModelNotFoundError as exc:
        raise ConfigError.at(source, "runtime.model", str(exc)) from None


def _replica_set(runtime: RuntimeConfig, keywords: dict[str, Any],
                 source: Path | None) -> EngineInterface:
    """``runtime.replicas`` engines on ``runtime.cluster``, each built with ``keywords``."""
    from runtime.ray_replica import RayUnavailable
    from runtime.replicas import build_replicas, engine_builder

    if runtime.executor == "modeled":
        # A modeled replica's decode run would take steps during which another replica's
        # completions wake agents with calls for it: step one by one, as the lockstep does.
        keywords = {**keywords, "decode_runs": False}
    try:
        return build_replicas(runtime.replicas, engine_builder(runtime.executor, **keywords),
                              cluster=runtime.cluster, on_failure=runtime.on_replica_failure,
                              ray_address=runtime.ray.address,
                              num_cpus_per_replica=runtime.ray.num_cpus_per_replica,
                              num_gpus_per_replica=runtime.ray.num_gpus_per_replica,
                              placement_strategy=runtime.ray.placement_strategy)
    except RayUnavailable as exc:
        raise ConfigError.at(source, "runtime.cluster", str(exc)) from None
