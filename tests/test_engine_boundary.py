"""Front ends drive the engine through its interface and nothing else.

``runtime.interface.EngineInterface`` is what the simulation, the server, the replica driver and
preflight use. These checks parse the code (never import it) and fail on the two ways around the
interface that grew before it existed:

* reaching an engine's parts from ``scalesim/``: ``<something>.engine.executor``,
  ``engine.scheduler``, ``engine.admission``, ``engine.memory`` (the attribute chain ends in a
  name ``engine`` and goes on to one of those parts);
* probing members with ``getattr`` / ``hasattr`` on an engine, executor or scheduler anywhere
  outside ``runtime/``: a member the interface lacks belongs in the interface.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_PARTS = {"executor", "scheduler", "admission", "memory"}
PROBED = ("engine", "executor", "scheduler")
OUTSIDE_RUNTIME = ("scalesim", "agents", "worlds", "experiments")


def _files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _ends_in_engine(node: ast.expr) -> bool:
    """Whether ``node`` is a name ``engine`` or an attribute ``.engine``/``._engine``."""
    if isinstance(node, ast.Name):
        return node.id.lstrip("_") == "engine"
    if isinstance(node, ast.Attribute):
        return node.attr.lstrip("_") == "engine"
    return False


def engine_reaches(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every ``....engine.<part>`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_PARTS \
                and _ends_in_engine(node.value):
            found.append((node.lineno, ast.unparse(node)))
    return found


def member_probes(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every ``getattr``/``hasattr`` on an engine, executor or scheduler."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr") and node.args:
            target = ast.unparse(node.args[0]).lower()
            if any(target.rstrip(")").endswith(name) or f"{name}." in target
                   or f".{name}" in target for name in PROBED):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_scalesim_does_not_reach_into_the_engine() -> None:
    problems = [f"{path.relative_to(ROOT)}:{line}: {text}"
                for path in _files("scalesim")
                for line, text in engine_reaches(path.read_text())]
    assert not problems, "use runtime.interface.EngineInterface instead:\n" + "\n".join(problems)


def test_no_member_probing_outside_runtime() -> None:
    problems = [f"{path.relative_to(ROOT)}:{line}: {text}"
                for path in _files(*OUTSIDE_RUNTIME)
                for line, text in member_probes(path.read_text())]
    assert not problems, "add the member to the interface instead:\n" + "\n".join(problems)


def test_the_checks_find_what_they_look_for() -> None:
    code = ("x = self.engine.executor.chat\n"
            "y = engine.scheduler.running\n"
            "z = sim.env.engine.memory\n"
            "ok = config.runtime.executor\n"
            "a = getattr(self.engine.executor, 'now', None)\n"
            "b = hasattr(engine, 'declare')\n"
            "c = getattr(module, 'World')\n")
    assert sorted(line for line, _ in engine_reaches(code)) == [1, 2, 3, 5]
    assert sorted(line for line, _ in member_probes(code)) == [5, 6]
