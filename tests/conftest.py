"""Shared fixtures: a character-level fake executor that drives the real Engine without a model."""

from __future__ import annotations

import ctypes
import gc
import os

import pytest

from typing import Any

from runtime import Engine, RequestError, build_engine
from runtime.interface import WallClock
from runtime.sequence import Batch, Sequence

EOS = 0


class CharChat:
    """Tokens are character codes; the prefix and the prompt are encoded separately (history
    turns, one after the other, before the prompt)."""

    def encode(self, prefix: str, prompt: str, history: Any = ()) -> tuple[list[int], list[int]]:
        earlier = "".join(str(turn.get("content") or "") for turn in history)
        return [ord(c) for c in prefix], [ord(c) for c in earlier + prompt]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)


class EchoExecutor:
    """Answers ``"<agent>:<prompt>"`` one character per iteration, then EOS.

    It records every batch so tests can check which requests ran together.
    """

    eos_token_ids = {EOS}

    def __init__(self, max_num_seqs: int = 8, max_context: int = 4096) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_context = max_context
        self.chat = CharChat()
        self.batches: list[list[int]] = []
        self.validated: list[int] = []
        self.engine_clock = WallClock()
        self.architecture = None

    def validate(self, seq: Sequence) -> None:
        """Rejects prompts that ask for it; records every request it saw."""
        self.validated.append(seq.request_id)
        if seq.request.prompt.startswith("REJECT"):
            raise RequestError(f"request {seq.request_id}: the echo executor rejects it")

    def memory_objects(self, seq: Sequence) -> list[Any]:
        return []

    def decode_horizon(self, seq: Sequence) -> int:
        return 1

    def report(self) -> dict[str, Any]:
        return {}

    def execute(self, batch: Batch) -> None:
        self.batches.append([seq.request_id for seq in batch])
        for seq in batch:
            answer = [ord(c) for c in f"{seq.request.agent_id}:{seq.request.prompt}"] + [EOS]
            seq.append_tokens([answer[len(seq.output_ids)]])


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@pytest.fixture(autouse=True)
def _free_engines_left_in_cycles() -> Any:
    """Collect cyclic garbage after a test that grew the process by more than 256 MiB.

    An engine's objects refer to each other (the manager, its tiers, the executor), so a
    dropped engine waits for the collector's oldest generation, which a large test session
    rarely runs: every torch engine's KV pool (about 1.5 GiB) stayed, and the whole suite in one
    process reached 23 GiB on a 24 GiB machine. Collecting only after such tests keeps the
    others fast."""
    before = _resident_bytes()
    yield
    if _resident_bytes() - before > 256 << 20:
        _collect()


@pytest.fixture(scope="module", autouse=True)
def _free_module_engines() -> Any:
    """The same after a module whose fixtures (engines shared by its tests) grew the process."""
    before = _resident_bytes()
    yield
    if _resident_bytes() - before > 256 << 20:
        _collect()


def _collect() -> None:
    """Free cyclic garbage, then give the freed heap pages back to the system: the weights of a
    dropped model are megabyte-sized tensors from malloc's heap, which keeps them otherwise."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


@pytest.fixture
def echo_engine() -> Engine:
    return build_engine(EchoExecutor())


@pytest.fixture(scope="session")
def smol_engine():
    """The real SmolLM2-135M through the hf executor, loaded once per test session."""
    from runtime import build_engine

    return build_engine("hf", model="smollm2-135m")


@pytest.fixture(scope="session")
def hf():
    """``(model, tokenizer)`` of the real SmolLM2-135M from transformers, loaded once."""
    from runtime.model.loader import load_hf_model

    return load_hf_model("smollm2-135m")


# -- the real model only in slow tests ------------------------------------------------------------
#
# `make test-fast` (-m "not slow") must load no model. Every load of the real weights in this
# process goes through runtime.model.loader.load_hf_model (the hf executor, the ``hf`` fixture)
# or load_checkpoint (the torch executor), so a test not marked slow that gets there fails,
# saying what to do. A session
# fixture (``smol_engine``, ``hf``) is built in the setup of the first test that asks for it:
# that test is the one named. (A model loaded by a subprocess, a CLI run, is not seen here.)

REAL_MODEL = "this test loads the real model: mark it slow (@pytest.mark.slow, and model)"

_current: list[pytest.Item] = []  # the test being set up, run or torn down


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _current.append(item)
    try:
        yield
    finally:
        _current.pop()


@pytest.fixture(scope="session", autouse=True)
def _real_model_only_in_slow_tests() -> Any:
    import runtime.executors.hf as hf_executor  # it binds load_hf_model at import: patch it too
    import runtime.model.loader as loader

    def guard(real: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            item = _current[-1] if _current else None
            if item is not None and item.get_closest_marker("slow") is None:
                pytest.fail(REAL_MODEL, pytrace=False)
            return real(*args, **kwargs)

        return guarded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_hf_model", guard(loader.load_hf_model))
        patch.setattr(hf_executor, "load_hf_model", guard(loader.load_hf_model))
        patch.setattr(loader, "load_checkpoint", guard(loader.load_checkpoint))
        yield
