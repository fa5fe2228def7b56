"""The compiled kernels' cache is shared by checkouts: one that finds another's build loads it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.model.kernels import CSRC

ROOT = Path(__file__).resolve().parents[1]
BUILD = ("import sys; from pathlib import Path; from runtime.model.kernels import _BASE_FLAGS, "
         "_build; print(_build(_BASE_FLAGS, Path(sys.argv[1])))")


@pytest.mark.slow
def test_two_checkouts_do_not_rebuild_each_others_kernels(tmp_path):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    checkouts = []
    for name in ("one", "two"):
        shutil.copytree(CSRC, tmp_path / name / "csrc")
        checkouts.append(tmp_path / name / "csrc")

    def build(csrc: Path) -> Path:
        done = subprocess.run([sys.executable, "-c", BUILD, str(csrc)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return Path(done.stdout.strip().splitlines()[-1])

    first = build(checkouts[0])
    library = next(first.glob("*.so"))
    built_at = library.stat().st_mtime_ns
    assert build(checkouts[1]) == first
    assert library.stat().st_mtime_ns == built_at  # loaded, not rebuilt
