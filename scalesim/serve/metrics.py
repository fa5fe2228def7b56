"""The server's counters, and their Prometheus text exposition for ``GET /metrics``.

The engine loop updates a :class:`ServeMetrics` after every iteration and every finished
request (one writer); the HTTP side only reads it. Hits and misses by kind, bytes loaded and
stall seconds come from the finished requests; bytes and objects resident per tier from the
``memory`` section of the engine's report, taken on the engine thread at scrape time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from runtime import Completion

MEMORY_KINDS = ("adapter", "prefix_kv", "model")


class ServeMetrics:
    """Counters of requests, tokens, batches and memory (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, outcome)
        self.prompt_tokens = self.cached_tokens = self.output_tokens = 0
        #: tokens of the inputs of answered embedding requests
        self.embedding_tokens = 0
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.bytes_loaded = 0
        self.stall_s = 0.0
        self.iterations = 0
        self.batch_seqs = 0
        self.max_batch = 0
        self.queue_depth = 0
        self.running = 0
        self.rejected_full = 0
        self.cancelled = 0

    def iteration(self, seqs: int, waiting: int, running: int) -> None:
        self.iterations += 1
        self.batch_seqs += seqs
        self.max_batch = max(self.max_batch, seqs)
        self.queue_depth, self.running = waiting, running

    def finished(self, endpoint: str, completion: Completion, outcome: str) -> None:
        self.requests[(endpoint, outcome)] += 1
        if outcome != "ok":
            return
        self.prompt_tokens += completion.prompt_tokens
        self.cached_tokens += completion.cached_tokens
        self.output_tokens += completion.output_tokens
        self.hits.update(completion.memory.hits)
        self.misses.update(completion.memory.misses)
        self.bytes_loaded += completion.memory.bytes_loaded
        self.stall_s += completion.memory.stall_s

    def refused(self, endpoint: str, outcome: str) -> None:
        """A request answered without reaching the engine (400, 404, 429...)."""
        self.count(endpoint, outcome)

    def count(self, endpoint: str, outcome: str) -> None:
        """One more request of ``endpoint`` answered with ``outcome``."""
        self.requests[(endpoint, outcome)] += 1

    def hit_rates(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for kind in MEMORY_KINDS:
            total = self.hits[kind] + self.misses[kind]
            out[kind] = round(self.hits[kind] / total, 4) if total else None
        return out

    def render(self, memory: dict[str, Any] | None = None, hints: Any = None) -> str:
        """Prometheus text format, version 0.0.4."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP scalesim_{name} {help}")
            lines.append(f"# TYPE scalesim_{name} {kind}")
            for labels, value in samples:
                lines.append(f"scalesim_{name}{labels} {value}")

        metric("requests_total", "counter", "Requests answered, by endpoint and outcome.",
               [(f'{{endpoint="{e}",outcome="{o}"}}', n)
                for (e, o), n in sorted(self.requests.items())])
        metric("tokens_total", "counter", "Tokens of successful requests, by kind (embedding: inputs embedded).",
               [('{kind="prompt"}', self.prompt_tokens), ('{kind="cached"}', self.cached_tokens),
                ('{kind="output"}', self.output_tokens),
                ('{kind="embedding"}', self.embedding_tokens)])
        metric("engine_iterations_total", "counter", "Engine iterations run.",
               [("", self.iterations)])
        metric("batch_sequences_total", "counter",
               "Sequences over all iterations (divide by iterations: mean batch size).",
               [("", self.batch_seqs)])
        metric("batch_size_max", "gauge", "Largest batch of one iteration.",
               [("", self.max_batch)])
        metric("queue_depth", "gauge", "Requests waiting to be admitted.",
               [("", self.queue_depth)])
        metric("running_requests", "gauge", "Requests in the running batch.",
               [("", self.running)])
        metric("rejected_queue_full_total", "counter", "Requests refused with 429.",
               [("", self.rejected_full)])
        metric("cancelled_total", "counter", "Requests cancelled by a client disconnect.",
               [("", self.cancelled)])
        metric("memory_hits_total", "counter", "Memory objects resident when needed, by kind.",
               [(f'{{kind="{k}"}}', self.hits[k]) for k in MEMORY_KINDS])
        metric("memory_misses_total", "counter", "Memory objects loaded on demand, by kind.",
               [(f'{{kind="{k}"}}', self.misses[k]) for k in MEMORY_KINDS])
        metric("memory_hit_rate", "gauge", "Hit rate by kind (absent: no access yet).",
               [(f'{{kind="{k}"}}', r) for k, r in self.hit_rates().items() if r is not None])
        metric("memory_bytes_loaded_total", "counter", "Bytes loaded for requests.",
               [("", self.bytes_loaded)])
        metric("memory_stall_seconds_total", "counter", "Seconds requests waited on loads.",
               [("", round(self.stall_s, 6))])
        if memory is not None:
            metric("memory_bytes", "gauge", "Agent-memory bytes resident per tier.",
                   [('{tier="device"}', memory["device_used_bytes"]),
                    ('{tier="host"}', memory["host_used_bytes"])])
            metric("memory_objects", "gauge", "Agent-memory objects, registered and resident.",
                   [('{state="registered"}', memory["objects"]),
                    ('{state="resident"}', memory["resident_objects"])])
        if hints is not None:
            metric("hints_total", "counter", "Distance hints by outcome.",
                   [('{outcome="applied"}', hints.applied), ('{outcome="stale_seq"}', hints.stale),
                    ('{outcome="expired"}', hints.expired)])
            metric("hinted_agents", "gauge", "Agents with a live hint.", [("", hints.hinted)])
            estimator = getattr(hints, "estimator", None)
            if estimator is not None:  # serve.stream_estimator: distances learned from arrivals
                metric("estimated_agents", "gauge",
                       "Agents with a next call predicted from the request stream.",
                       [("", estimator.estimated)])
                metric("stream_predictions_total", "counter",
                       "Next-call predictions the stream estimator made.",
                       [("", estimator.predictions)])
                metric("stream_rounds_total", "counter",
                       "Rounds the stream estimator saw (idle gaps with nothing pending).",
                       [("", estimator.rounds)])
        return "\n".join(lines) + "\n"
