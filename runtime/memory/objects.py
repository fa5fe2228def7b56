"""Agent memory: the pieces of per-agent state the runtime may keep on the device.

An :class:`AgentMemory` is one immutable object — a LoRA adapter, the KV cache of an agent's
persona prefix, a whole model — identified by a string ``key`` and owned by one or more agents
(its *users*). The :class:`~runtime.memory.manager.MemoryManager` decides in which tiers it has a
copy (device, host, disk); the object itself says how big it is and how to rebuild it from its
*origin* when no copy is left:

* ``origin = "disk"``: :meth:`AgentMemory.materialize` reads the object's own file (an adapter);
* ``origin = "recompute"``: :meth:`AgentMemory.materialize` computes it again (a prefix KV is
  re-prefilled; a synthetic test object is regenerated from its seed).

Because objects are immutable, a device copy can be dropped whenever a host or disk copy exists,
and every copy of an object is bit-identical to every other.

A world registers its own kind by subclassing :class:`AgentMemory` (set ``kind``, ``origin``,
implement :meth:`materialize` and give ``nbytes``) or by building a :class:`TensorMemory` with a
function that returns the tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

Tensors = dict[str, torch.Tensor]


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class AgentMemory:
    """Base class of every memory object.

    Subclasses set ``kind`` (the name used in hit/miss statistics), ``origin`` and, when
    :meth:`materialize` must run on the thread that owns the model (a re-prefill), ``threadsafe =
    False``. The manager-owned fields (``device``, ``host``, ``disk_path``, ``users``, ``pins``)
    are the object's state; only the manager writes them.

    :attr:`identity` (JSON-able, ``None`` by default) says what the contents are computed
    from, completely: for a persona's prefix KV the model, adapter, dtype and tokens. Objects
    with one can be kept in the persistent store (:mod:`runtime.memory.kv_store`) and found
    there by a later run.
    """

    kind: ClassVar[str] = "custom"
    origin: ClassVar[str] = "recompute"
    threadsafe: ClassVar[bool] = True

    def __init__(self, key: str, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"memory object {key!r}: nbytes must be >= 0, got {nbytes}")
        self.key = key
        self.nbytes = int(nbytes)
        self.device: Tensors | None = None
        self.host: Tensors | None = None
        self.disk_path: Path | None = None
        self.users: set[str] = set()
        self.pins = 0
        self.identity: dict[str, Any] | None = None
        #: the object this one continues and is of no use without (a prefix segment's parent)
        self.parent: AgentMemory | None = None

    def dependents(self) -> Iterable[AgentMemory]:
        """Objects that are of no use on the device without this one (a prefix segment's
        continuations). While one of them is resident this object is not evicted: eviction is
        leaf-first. None by default."""
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key} {self.nbytes} B>"

    def materialize(self) -> Tensors:
        """Build the object's tensors (on the CPU) from its origin."""
        raise NotImplementedError

    def preload(self) -> Tensors | None:
        """The object's contents as if it had been on the device since the run began, or
        ``None`` where that cannot be had without doing the work (the ``infinite`` bound then
        loads it on first use). Only a model of the hardware can say yes for free."""
        return None

    def on_device(self, tensors: Tensors) -> Tensors:
        """The loaded device tensors arrived; install them where the engine reads them.

        Returns what the manager keeps as :attr:`device` (an engine that copies them into its
        own pool may return an empty dict). Runs on the engine's thread.
        """
        return tensors

    def off_device(self) -> None:
        """The object leaves the device: let the engine forget where it was installed."""

    def device_tensors(self) -> Tensors:
        """The object's current device contents, read just before it leaves the device.

        The manager copies them to the host or disk tier. An engine that installed the object
        into its own pool (so :attr:`device` is empty) reads them back from there; an empty dict
        means there is nothing worth keeping (the object is dropped and later rebuilt).
        """
        return self.device or {}

    @property
    def resident(self) -> bool:
        return self.device is not None


class TensorMemory(AgentMemory):
    """A memory object whose tensors come from a function: custom kinds and synthetic tests."""

    def __init__(self, key: str, build: Callable[[], Tensors], nbytes: int | None = None, *,
                 kind: str = "custom", origin: str = "recompute") -> None:
        if nbytes is None:
            nbytes = tensors_nbytes(build())
        super().__init__(key, nbytes)
        self._build = build
        self.kind = kind  # type: ignore[misc]  # per-instance kind for world-defined types
        self.origin = origin  # type: ignore[misc]

    def materialize(self) -> Tensors:
        tensors = self._build()
        got = tensors_nbytes(tensors)
        if got != self.nbytes:
            raise ValueError(f"memory object {self.key!r}: built {got} bytes, declared {self.nbytes}")
        return tensors


def _safetensors_nbytes(path: Path) -> int:
    """Tensor bytes of a safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(end - start for name, meta in header.items() if name != "__metadata__"
               for start, end in [meta["data_offsets"]])


class AdapterFile(AgentMemory):
    """A PEFT-format LoRA adapter directory (``adapter_model.safetensors``); origin: its file."""

    kind = "adapter"
    origin = "disk"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = self.path / "adapter_model.safetensors" if self.path.is_dir() else self.path
        if not self.file.is_file():
            raise FileNotFoundError(f"LoRA adapter {path}: no adapter_model.safetensors")
        super().__init__(f"adapter:{self.path}", _safetensors_nbytes(self.file))

    def materialize(self) -> Tensors:
        from runtime.memory.object_file import read_safetensors

        return read_safetensors(self.file)


class ModelWeights(AgentMemory):
    """A whole model's weights, e.g. one model per agent group; ``load()`` returns its tensors."""

    kind = "model"
    origin = "disk"

    def __init__(self, name: str, load: Callable[[], Tensors], nbytes: int) -> None:
        super().__init__(f"model:{name}", nbytes)
        self._load = load

    def materialize(self) -> Tensors:
        return self._load()
