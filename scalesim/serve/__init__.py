"""An OpenAI-compatible server over ScaleSim's engine, for simulators written elsewhere.

``python -m scalesim.serve`` serves ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` from one engine (a :class:`~runtime.engine.Engine`, or a
:class:`~runtime.replicas.ReplicaSet` with ``runtime.replicas`` > 1) driven by one engine loop,
so concurrent HTTP clients are batched together. Each request is resolved to an agent
(:mod:`~scalesim.serve.identity`), whose adapter and persona-prefix KV are memory objects under
the engine's memory manager exactly as in a simulation run; clients that can send hints
(:mod:`~scalesim.serve.hints`) give that manager invocation distances.

Modules, in the order a request meets them: :mod:`~scalesim.serve.app` (HTTP),
:mod:`~scalesim.serve.protocol` (bodies), :mod:`~scalesim.serve.errors`,
:mod:`~scalesim.serve.identity`, :mod:`~scalesim.serve.prompt`, :mod:`~scalesim.serve.loop`
(the engine thread), :mod:`~scalesim.serve.metrics`, :mod:`~scalesim.serve.recording`;
:mod:`~scalesim.serve.server` assembles them.
"""

from scalesim.serve.server import Server, build_server

__all__ = ["Server", "build_server"]
