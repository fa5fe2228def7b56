"""The persistent store: computed memory objects kept on disk across runs, by what they are.

A persona's prefix KV costs a prefill to compute and is the same every time the same model,
adapter and dtype see the same tokens. :class:`KVStore` keeps such objects in a directory
(``runtime.memory.kv_store``) under a name derived from their *identity* (the
:attr:`~runtime.memory.objects.AgentMemory.identity` dict), so the second run of a world finds
its personas there and loads them instead of prefilling them. Within a run the store is also the
object's disk tier: an evicted persona is written once, to the store, and read back from it.

Files are :mod:`~runtime.memory.object_file` files: written to a temporary name and renamed (two
runs sharing a store never see half a file), checksummed, and carrying the identity they were
computed for, which a read checks, so an entry of another model or dtype is never used even if
two identities collided on a name. The store keeps at most ``cap_bytes``; beyond it the entries
used longest ago (by modification time, refreshed on every use) are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from runtime.memory.object_file import Tensors, write_object

SUFFIX = ".kvobj"


def identity_name(identity: dict[str, Any]) -> str:
    """The file name of an identity: a hash of its canonical JSON."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:40] + SUFFIX


class KVStore:
    """Objects by identity in ``directory``, at most ``cap_bytes`` (``None``: no cap)."""

    def __init__(self, directory: str | Path, cap_bytes: int | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cap_bytes = cap_bytes
        self.bytes_written = 0
        self.entries_written = 0
        self.entries_found = 0
        self._used = sum(p.stat().st_size for p in self._files())

    def __repr__(self) -> str:
        return f"<KVStore {self.directory} {self._used} B>"

    def _files(self) -> list[Path]:
        return [p for p in self.directory.glob("*" + SUFFIX) if p.is_file()]

    def path_of(self, identity: dict[str, Any]) -> Path:
        return self.directory / identity_name(identity)

    def has(self, identity: dict[str, Any]) -> bool:
        """Whether the store has an entry of ``identity`` (nothing is refreshed)."""
        return self.path_of(identity).is_file()

    def find(self, identity: dict[str, Any]) -> Path | None:
        """The entry of ``identity`` if the store has it (its use time is refreshed)."""
        path = self.path_of(identity)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        self.entries_found += 1
        return path

    def put(self, identity: dict[str, Any], tensors: Tensors) -> Path:
        """Write the entry of ``identity`` (atomically) and keep the store under its cap."""
        path = self.path_of(identity)
        old = path.stat().st_size if path.exists() else 0
        size = write_object(path, tensors, identity)
        self._used += size - old
        self.bytes_written += size
        self.entries_written += 1
        self._trim(keep=path)
        return path

    def discard(self, path: Path) -> None:
        """Delete an entry that turned out unusable (damaged, or someone else's)."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self._used -= size

    def _trim(self, keep: Path) -> None:
        if self.cap_bytes is None or self._used <= self.cap_bytes:
            return
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except FileNotFoundError:  # another run trimmed it
                continue
            files.append((st.st_mtime, p, st.st_size))
        self._used = sum(size for _, _, size in files)
        for _, p, size in sorted(files):
            if self._used <= self.cap_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                self._used -= size

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.directory), "bytes": int(self._used),
                "entries_found": self.entries_found, "entries_written": self.entries_written,
                "bytes_written": int(self.bytes_written)}
