"""What the measured experiments share: timing an engine, serving agents in turn, reporting.

Every measured number comes through the engine's one interface
(:class:`runtime.interface.EngineInterface`), never by reaching into its executor:

* :class:`StepTimes` listens to an engine (``engine.listen``) and sums its
  :class:`~runtime.interface.StepTimed` events: wall seconds inside the executor's forward
  passes, iterations, sequences and tokens. World, scheduling and memory admission stay outside
  the count, so policies and engines are compared on the model's compute.
* :func:`measured_run` runs a world on the engine its ``runtime`` section describes, timing the
  whole run (the makespan) and its forward passes.
* :func:`serve_in_turn` serves agents that each make several calls in a row, an agent's next call
  submitted as soon as its previous one finishes, as in a simulation.
* :func:`alternating` orders A/B passes so that a drift in the machine's speed falls on both
  sides alike, and :func:`headline` prints (and keeps) an experiment's closing JSON line.
* :func:`machine_peaks` measures what this machine's cores and memory can do at best, the
  yardstick of achieved GFLOP/s and GB/s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from experiments.results_dir import results_dir
from runtime.interface import EngineEvent, EngineInterface, EngineListener, StepTimed
from runtime.request import Completion, Request

if TYPE_CHECKING:
    from scalesim.config import RunConfig

S = TypeVar("S")


@dataclass
class StepTimes:
    """Totals of an engine's timed forward passes, fed by ``engine.listen`` (see :meth:`of`)."""

    #: wall seconds inside the executor's forward passes
    seconds: float = 0.0
    #: forward passes (engine iterations that ran a batch)
    steps: int = 0
    #: sequences summed over the passes (``sequences / steps`` is the mean batch)
    sequences: int = 0
    #: tokens computed, and those of them that were prompt (prefill) tokens
    tokens: int = 0
    prefill_tokens: int = 0

    @classmethod
    def of(cls, engine: EngineInterface) -> StepTimes:
        """A :class:`StepTimes` that counts every forward pass ``engine`` runs from now on."""
        times = cls()
        engine.listen(times)
        return times

    def __call__(self, event: EngineEvent) -> None:
        if not isinstance(event, StepTimed):
            return  # a memory event
        self.seconds += event.wall_s
        self.steps += 1
        self.sequences += event.sequences
        self.tokens += event.tokens
        self.prefill_tokens += event.prefill_tokens

    @property
    def mean_batch(self) -> float:
        return self.sequences / self.steps if self.steps else 0.0


@dataclass
class MeasuredRun:
    """One world run on a real engine, measured."""

    #: the run's trace, memory log and summary (:func:`scalesim.simulate`'s result)
    result: Any
    #: wall seconds of the whole run, the world's own Python time included
    makespan_s: float
    #: the forward passes of the run
    steps: StepTimes


def measured_run(config: dict[str, Any] | RunConfig, out: Path, listeners: Sequence[EngineListener] = (),
                 **engine_options: Any) -> MeasuredRun:
    """Run the world ``config`` (a dict or a loaded :class:`~scalesim.config.RunConfig`)
    describes on the engine of its ``runtime`` section.

    ``engine_options`` go to the engine's assembly (an already loaded ``hf_model`` and
    ``tokenizer``, so that one model serves several runs); ``listeners`` also hear the engine's
    events. The engine is built before the clock starts and closed by the run.
    """
    from scalesim import simulate
    from scalesim.config import load_config
    from scalesim.assembly import assemble_engine

    loaded = load_config(config)
    engine = assemble_engine(loaded.runtime, source=loaded.source, **engine_options)
    steps = StepTimes.of(engine)
    for listener in listeners:
        engine.listen(listener)
    start = time.perf_counter()
    result = simulate(config, out=out, engine=engine)
    return MeasuredRun(result, time.perf_counter() - start, steps)


def serve_in_turn(engine: EngineInterface, agents: int, calls: int,
                  request: Callable[[int, int], Request]
                  ) -> Iterator[tuple[int, int, Completion]]:
    """Serve ``calls`` calls of each of ``agents`` agents, ``request(agent, call)`` making each.

    Every agent's first call is submitted at once and its next one as soon as the previous one
    finishes. Yields ``(agent, call, completion)`` as calls finish; a failed call raises
    :class:`RuntimeError`, since a benchmark with a failed call measures something else.
    """
    which: dict[int, tuple[int, int]] = {}
    for agent in range(agents):
        which[engine.submit(request(agent, 0))] = (agent, 0)
    while engine.has_work():
        for done in engine.step().finished:
            agent, call = which.pop(done.request_id)
            if done.error:
                raise RuntimeError(f"agent {agent} call {call} failed: {done.error}")
            if call + 1 < calls:
                which[engine.submit(request(agent, call + 1))] = (agent, call + 1)
            yield agent, call, done


def alternating(passes: int, sides: Sequence[S]) -> Iterator[list[S]]:
    """The order of ``sides`` in each of ``passes`` A/B passes: as given in even passes, reversed
    in odd ones, so that the machine getting faster or slower over a run (other jobs, clock
    speed) weighs on every side alike; compare the sides' medians over the passes."""
    for p in range(passes):
        yield list(sides) if p % 2 == 0 else list(reversed(sides))


def headline(line: dict[str, Any], keep_as: str | None = None, quick: bool = False
             ) -> dict[str, Any]:
    """Print an experiment's closing JSON line; ``keep_as`` also writes it, indented, to
    ``results/<keep_as>.json`` (``results/quick/`` for a quick run). Returns ``line``."""
    print(json.dumps(line))
    if keep_as is not None:
        (results_dir(quick) / f"{keep_as}.json").write_text(json.dumps(line, indent=1) + "\n")
    return line


def machine_peaks(seconds: float = 1.0) -> dict[str, float]:
    """This machine's measured peaks with torch's threads: float32 and bfloat16 GEMM GFLOP/s
    (2048-cube products) and memory GB/s (read + write of a 256 MiB copy), best of repeats."""
    import torch

    from runtime.model.weights import select_gemm

    def best(run: Callable[[], Any], work: float) -> float:
        run()
        rates: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 3:
            start = time.perf_counter()
            run()
            rates.append(work / (time.perf_counter() - start))
        return max(rates)

    n = 2048
    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        gemm = select_gemm(a.device, dtype)  # oneDNN for float32, as the engine uses
        peaks[f"gflops_{name}"] = max(best(lambda: torch.mm(a, b), 2 * n ** 3),
                                      best(lambda: gemm(a, b), 2 * n ** 3)) / 1e9
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    peaks["mem_gbps"] = best(lambda: dst.copy_(src), 2 * src.numel() * 4) / 1e9
    return peaks
