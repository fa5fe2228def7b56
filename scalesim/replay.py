"""Answering a run's LLM calls from an earlier run's record: resuming a run, and a call cache.

A simulation's processes are generators and cannot be saved, but a run is deterministic given
its seed and its LLM replies. So a run that was killed (or finished) can be *replayed*: the world
runs again from its seed and each call is answered from the earlier run's trace instead of the
engine, in no engine time, until the calls stop matching; from there on the run goes live. The
record must say enough to match a call and to deliver its reply at the same point of the run:

* a call is identified by its agent, its position in that agent's sequence of calls
  (``agent_call``), a digest of everything the model reads (persona, history, prompt:
  ``request_hash``), its sampling parameters (``sampling``) and its adapter;
* a reply is given when the call is made, and the agent resumes at the call's due time in the
  place the event queue gives every answer (:mod:`scalesim.environment`), which does not depend
  on when the engine finished it: so the world's processes resume in the order they did live and
  the trajectory is the same. (``iteration``, the engine iteration that finished the call, only
  keeps the live iterations of a resumed run numbered after the recorded ones.)

Two modes (the ``replay`` section of a run's configuration):

``resume``
    Replay while every call matches the record, in order; the first call that does not match
    (the differing field is named), that is not recorded, or whose recorded call failed, and
    every call after it, goes to the engine. ``python -m scalesim.run world.yaml --resume DIR``.
``cache``
    Any call that matches a recorded call of the same agent at the same position is answered
    from the record, the others go to the engine: a cache for re-running an analysis, or for the
    runs of a sweep that share the start of their trajectory.

A recorded call is only a valid answer when sampling is reproducible: greedy, or seeded
(:meth:`scalesim.Agent.llm` seeds every call with ``temperature > 0`` from the world's random
generator, itself seeded by ``sim.seed``); a record holding an unseeded sampled call is refused.
So is a record of another world, seed or model (:func:`check_compatible`).

Replayed calls do not touch the engine's memory manager: when the run goes live, the memory of
the agents is where a fresh run's would be (nothing resident), so the first live calls compute
their personas and prefixes again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime import Completion, Request
from scalesim.config import ConfigError, RunConfig
from scalesim.trace import load_trace, request_hash, sampling_text

ReplayMode = Literal["resume", "cache"]

#: configuration keys whose difference makes a record useless: (section path, what it is)
_SAME = (("world", "class"), ("sim", "seed"), ("runtime", "executor"), ("runtime", "model"),
         ("runtime", "dtype"), ("runtime", "quantization"), ("runtime", "random_weights"))

#: the trace columns a replay needs (a trace written before them cannot be replayed)
COLUMNS = ("agent_call", "request_hash", "sampling", "adapter", "iteration")


@dataclass(frozen=True)
class RecordedCall:
    """One call of the record: what identifies it and the reply to give."""

    row: int
    agent: str
    position: int
    request_hash: str
    sampling: str
    adapter: str
    iteration: int
    sim_time: float
    request_id: int
    text: str
    finish_reason: str
    error: str | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int

    def differs(self, request: Request) -> str | None:
        """The first field in which ``request`` differs from this call, or None."""
        if request_hash(request) != self.request_hash:
            return "prompt (persona, history or prompt text)"
        if sampling_text(request) != self.sampling:
            return f"sampling ({sampling_text(request)} != {self.sampling})"
        if (request.adapter or "") != self.adapter:
            return f"adapter ({request.adapter!r} != {self.adapter!r})"
        return None

    def completion(self, request_id: int, wall: float) -> Completion:
        """The recorded reply as this run's completion of ``request_id``."""
        return Completion(request_id=request_id, agent_id=self.agent, text=self.text,
                          prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                          output_tokens=self.output_tokens, finish_reason=self.finish_reason,
                          submit_wall=wall, first_token_wall=wall, finish_wall=wall)


def _value(value: Any, default: Any) -> Any:
    """A trace cell as a plain value (pandas gives NaN / None for missing ones)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


class Replay:
    """The calls of the run recorded in ``run_dir``, answered in ``mode`` (module docstring)."""

    def __init__(self, run_dir: str | Path, mode: ReplayMode = "resume") -> None:
        self.run_dir = Path(run_dir)
        self.mode = mode
        try:
            record = load_trace(self.run_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"replay.run: {self.run_dir}: no run record there ({exc})") from None
        self.config: dict[str, Any] = record.summary.get("config") or {}
        trace = record.trace
        missing = [c for c in COLUMNS if c not in trace.columns]
        if missing and len(trace):
            raise ConfigError(f"replay.run: {self.run_dir}: recorded before runs could be "
                              f"replayed (no {', '.join(missing)} column)")
        self._calls: dict[str, list[RecordedCall]] = {}
        for row, r in enumerate(trace.itertuples(index=False)):
            call = RecordedCall(
                row=row, agent=str(r.agent), position=int(r.agent_call),
                request_hash=str(r.request_hash), sampling=str(r.sampling),
                adapter=str(_value(r.adapter, "")), iteration=int(r.iteration),
                sim_time=float(r.sim_time), request_id=int(r.request_id),
                text=str(_value(r.completion, "")), finish_reason=str(r.finish_reason),
                error=_value(r.error, None), prompt_tokens=int(r.prompt_tokens),
                cached_tokens=int(r.cached_tokens), output_tokens=int(r.output_tokens))
            sampling = json.loads(call.sampling)
            if sampling["temperature"] > 0 and sampling["seed"] is None:
                raise ConfigError(
                    f"replay.run: {self.run_dir}: call {call.position} of agent {call.agent!r} "
                    f"sampled at temperature {sampling['temperature']} without a seed, so no "
                    "run can reproduce it (Agent.llm seeds such calls from sim.seed; give "
                    "requests built by hand a seed)")
            self._calls.setdefault(call.agent, []).append(call)
        for calls in self._calls.values():
            calls.sort(key=lambda c: c.position)
        self.recorded = len(trace)
        #: ids for this run's live requests, after the recorded ones (ids stay unique)
        self._next_id = int(trace.request_id.max()) + 1 if len(trace) else 0
        #: calls answered from the record so far
        self.replayed = 0
        #: resume: where and why the run went live (None while it replays)
        self.live_from: dict[str, Any] | None = None

    def check_compatible(self, config: RunConfig) -> None:
        """Refuse a record of another world, seed or model (one line naming the key)."""
        mine = config.echo()
        for section, key in _SAME:
            theirs = (self.config.get(section) or {}).get(key)
            ours = (mine.get(section) or {}).get(key)
            if theirs != ours:
                raise ConfigError(f"replay.run: {self.run_dir} was recorded with "
                                  f"{section}.{key}={theirs!r}, this run has {ours!r}")

    def answer(self, agent: str, position: int, request: Request,
               sim_time: float) -> RecordedCall | None:
        """The recorded call that answers ``agent``'s call number ``position``, or None (the
        call goes to the engine; in ``resume`` mode, so does every later one)."""
        if self.mode == "resume" and self.live_from is not None:
            return None
        calls = self._calls.get(agent, [])
        recorded = calls[position] if position < len(calls) else None
        if recorded is not None and recorded.position != position:
            recorded = None  # a gap: the record lost this agent's earlier call
        why = None
        if recorded is None:
            why = "end of record"
        elif recorded.error is not None:
            why = f"the recorded call failed ({recorded.error})"
        else:
            why = recorded.differs(request)
            if why is None and recorded.sim_time != sim_time:
                why = f"sim time ({sim_time} != recorded {recorded.sim_time})"
        if why is None:
            self.replayed += 1
            return recorded
        if self.mode == "resume":
            self.live_from = {"agent": agent, "call": position, "sim_time": sim_time,
                              "reason": why, "after_replayed": self.replayed}
        return None

    def next_request_id(self) -> int:
        """A request id no recorded call has (for a live call of this run)."""
        self._next_id += 1
        return self._next_id - 1

    def report(self) -> dict[str, Any]:
        """The ``replay`` section of the summary."""
        line: dict[str, Any] = {"from": str(self.run_dir), "mode": self.mode,
                                "recorded_calls": self.recorded, "replayed_calls": self.replayed}
        if self.mode == "resume":
            line["live_from"] = self.live_from
        return line
