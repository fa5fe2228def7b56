"""Calls of duration 0 keep their traces: the same traces, bit for bit.

The golden traces under ``tests/golden/duration_zero/`` were first recorded by this file's
``__main__`` on the commit before calls could take simulated time (b1596cd), with the fake engine
and with the torch engine on the real SmolLM2-135M, and recorded again when answers got their
own place in the event queue (agents of one instant resume in request order, whatever iteration
the engine finished their calls in): town and round_table kept theirs; social_feed's agents share
one random generator and now draw from it in another order. Every column that does not measure
wall time is compared exactly; the world's metrics too. To record them again (only when a change
is meant to change traces), run from the repository root::

    python tests/test_duration_zero.py tests/golden/duration_zero [--torch]
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "duration_zero"

#: Replies that steer the worlds' branches (posts, reposts, votes, moves), chosen per request.
REPLIES = ("post about the rain", "reply: agreed", "nothing", "repost", "yes", "no", "ok",
           "I vote for Ada", "go to the market", "")

#: Small runs of each world: (yaml overrides for the fake engine, for the torch engine).
WORLDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "town": ({"world__params__villagers": 5, "world__params__reflect_every": 2,
              "sim__until": 1320},
             {"world__params__villagers": 3, "world__params__max_tokens": 4,
              "sim__until": 900}),
    "social_feed": ({"world__params__users": 40, "sim__until": 1440},
                    {"world__params__users": 8, "world__params__attach": 1,
                     "world__params__max_tokens": 4, "sim__until": 900}),
    "round_table": ({"world__params__tables": 2, "world__params__players": 5,
                     "world__params__rounds": 2},
                    {"world__params__tables": 1, "world__params__players": 4,
                     "world__params__rounds": 1, "world__params__max_tokens": 4}),
}

#: Trace columns that measure wall time (never reproducible) and are left out.
WALL_COLUMNS = ("submit_wall", "first_token_wall", "finish_wall", "stall_s")


def reply(request: Any) -> str:
    """A reply that depends on the request alone (crc32: the same in every process)."""
    return REPLIES[zlib.crc32(f"{request.agent_id}|{request.prompt}".encode()) % len(REPLIES)]


def plain(value: Any) -> Any:
    """A trace cell as plain JSON data (numpy scalars unwrapped, NaN as None)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def record(result: Any, columns: list[str]) -> dict[str, Any]:
    """The reproducible part of a run: its trace rows (``columns``) and the world's metrics."""
    rows = [{k: plain(v) for k, v in row.items()}
            for row in result.trace[columns].to_dict("records")]
    return {"trace": rows, "world": result.summary["world"], "sim_time": result.summary["sim_time"]}


def run(world: str, engine_kind: str, out: Path) -> Any:
    import scalesim

    fake, torch_overrides = WORLDS[world]
    if engine_kind == "fake":
        engine: Any = FakeEngine(reply)
        overrides = fake
    else:
        from runtime import build_engine

        engine = build_engine("torch", model="smollm2-135m")
        overrides = torch_overrides
    return scalesim.simulate(f"worlds/{world}.yaml", out=out, engine=engine, **overrides)


def golden_columns(golden: dict[str, Any]) -> list[str]:
    return list(golden["trace"][0]) if golden["trace"] else []


def check(world: str, engine_kind: str, tmp_path: Path) -> None:
    golden = json.loads((GOLDEN / f"{world}_{engine_kind}.json").read_text())
    result = run(world, engine_kind, tmp_path)
    assert len(golden["trace"]) > 0
    got = record(result, golden_columns(golden))
    # Every metric recorded then is the same now (the summary may carry more since: counters).
    assert {k: got["world"].get(k) for k in golden["world"]} == golden["world"]
    assert got["sim_time"] == golden["sim_time"]
    assert len(got["trace"]) == len(golden["trace"])
    for mine, theirs in zip(got["trace"], golden["trace"]):
        assert mine == theirs
    # The due time of a call of duration 0 is when it was made, and it returns then.
    assert (result.trace["due"] == result.trace["sim_time"]).all()
    assert (result.trace["sim_time_done"] == result.trace["sim_time"]).all()


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_duration_zero_keeps_the_fake_engine_trace(world: str, tmp_path: Path) -> None:
    check(world, "fake", tmp_path)


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_duration_zero_keeps_the_torch_engine_trace(world: str, tmp_path: Path) -> None:
    check(world, "torch", tmp_path)


def main(argv: list[str]) -> None:
    """Record the golden traces into ``argv[0]`` (with ``--torch``, the torch ones too)."""
    import tempfile

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["fake"] + (["torch"] if "--torch" in argv else [])
    for kind in kinds:
        for world in sorted(WORLDS):
            with tempfile.TemporaryDirectory() as tmp:
                result = run(world, kind, Path(tmp))
            columns = [c for c in result.trace.columns if c not in WALL_COLUMNS]
            path = out / f"{world}_{kind}.json"
            path.write_text(json.dumps(record(result, columns), indent=0) + "\n")
            print(f"{path}: {len(result.trace)} calls")


if __name__ == "__main__":
    main(sys.argv[1:])
