"""The package structure: no import cycles, and ``runtime`` stays below the simulation layers.

Every ``.py`` file of the project's packages is parsed with :mod:`ast`, never imported, so the
check takes a fraction of a second and cannot be fooled by import order or lazy imports. Imports
inside functions count: they run the first time the function is called, and a cycle closed that way
still means the two modules cannot be understood (or tested) apart. Imports under
``if TYPE_CHECKING:`` never run, so they are left out of the cycle check; the layering check still
counts them, because ``runtime`` should not name simulation types either.

An edge from a package's ``__init__`` to one of its own submodules does not count toward a cycle:
re-exporting submodules is what an ``__init__`` is for, and by the time a submodule runs, its
package is already in ``sys.modules``.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "scalesim", "agents", "worlds", "experiments")
#: ``runtime`` is the serving layer; these are built on top of it and must not be imported by it.
ABOVE_RUNTIME = ("scalesim", "agents", "worlds", "experiments")


@dataclass(frozen=True)
class Import:
    """One import statement's target in ``module``, as an absolute dotted name."""

    module: str
    target: str
    #: The name after ``from target import``, which may be a submodule; None for ``import target``.
    name: str | None
    path: Path
    line: int
    type_checking: bool


@dataclass(frozen=True)
class Edge:
    """``source`` runs ``target`` when it executes the import at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The dotted name of the file ``path`` under ``root`` and whether it is a package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, module: str, is_package: bool, path: Path) -> list[Import]:
    """Every import in ``tree``, at any depth, with relative names made absolute."""
    found: list[Import] = []
    # The package that a level-1 relative import starts from.
    here = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, None, path, node.lineno, type_checking))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".") if here else []
                if node.level - 1 > len(package):
                    return  # above the top level: Python refuses it, nothing to resolve
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                name = None if alias.name == "*" else alias.name
                found.append(Import(module, base, name, path, node.lineno, type_checking))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        for sub in ast.iter_child_nodes(node):
            visit(sub, type_checking)

    visit(tree, False)
    return found


@dataclass
class Project:
    """The modules of the project's packages and every import in them."""

    modules: dict[str, Path]
    packages: set[str]
    imports: list[Import]

    def resolve(self, name: str) -> str | None:
        """The project module that ``import name`` runs last: ``name`` or its longest known prefix."""
        while name:
            if name in self.modules:
                return name
            name = name.rpartition(".")[0]
        return None

    def edges(self, *, type_checking: bool) -> list[Edge]:
        """Module-to-module edges among project modules, less an ``__init__``'s own submodules.

        An import of ``a.b.c`` also runs ``a`` and ``a.b``; those count too, except the packages
        that contain the importing module (they are always imported before it).
        """
        out: list[Edge] = []
        for imp in self.imports:
            if imp.type_checking and not type_checking:
                continue
            targets: list[str] = []
            submodule = f"{imp.target}.{imp.name}" if imp.target and imp.name else None
            if submodule is not None and submodule in self.modules:
                targets.append(submodule)
            resolved = self.resolve(imp.target)
            if resolved is not None:
                targets.append(resolved)
            for target in set(targets):
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):
                    step = ".".join(parts[:depth])
                    if step not in self.modules or step == imp.module:
                        continue
                    if depth < len(parts) and _within(imp.module, step):
                        continue  # a package of the importer: already running
                    if imp.module in self.packages and _within(step, imp.module):
                        continue  # an __init__ importing its own submodules
                    out.append(Edge(imp.module, step, imp.path, imp.line))
        return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def scan(root: Path, packages: tuple[str, ...]) -> Project:
    """Parse every ``.py`` file of ``packages`` under ``root``."""
    modules: dict[str, Path] = {}
    is_pkg: set[str] = set()
    imports: list[Import] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, is_package = module_name(root, path)
            modules[name] = path
            if is_package:
                is_pkg.add(name)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            imports += _imports(tree, name, is_package, path)
    return Project(modules, is_pkg, imports)


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle per strongly connected component that has one, as its edges."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)  # first import site per pair
        graph.setdefault(e.target, {})
    # Tarjan's algorithm, iterative so a deep chain cannot hit the recursion limit.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Breadth-first from start, inside the component, back to start: a shortest cycle.
        parent: dict[str, Edge] = {}
        frontier = [start]
        closing: Edge | None = None
        while frontier and closing is None:
            nxt = []
            for node in frontier:
                for child, e in sorted(graph[node].items()):
                    if child not in members:
                        continue
                    if child == start:
                        closing = e
                        break
                    if child not in parent:
                        parent[child] = e
                        nxt.append(child)
                if closing is not None:
                    break
            frontier = nxt
        assert closing is not None  # a strongly connected component always closes
        path = [closing]
        while path[0].source != start:
            path.insert(0, parent[path[0].source])
        cycles.append(path)
    return cycles


def describe(cycle: list[Edge], root: Path) -> str:
    """``a -> b -> a`` and, under it, the import line of each step."""
    names = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    sites = "\n".join(f"    {e.source} -> {e.target}  ({e.path.relative_to(root)}:{e.line})"
                      for e in cycle)
    return f"  {names}\n{sites}"


@functools.lru_cache(maxsize=None)
def project() -> Project:
    return scan(ROOT, PACKAGES)


# -- the project ------------------------------------------------------------------------------


def test_scan_sees_the_packages() -> None:
    """Guards the two checks below against passing because nothing was found."""
    p = project()
    for name in ("runtime", "runtime.engine", "scalesim.config", "agents", "worlds"):
        assert name in p.modules, f"{name} not found under {ROOT}"
    sources = {e.source for e in p.edges(type_checking=True)}
    assert "runtime.engine" in sources and "scalesim.config" in sources


def test_no_import_cycles() -> None:
    cycles = find_cycles(project().edges(type_checking=False))
    if cycles:  # pytest.fail: the message alone, without a repr of the edges under it
        pytest.fail(f"{len(cycles)} import cycle(s) among project modules (imports inside "
                    "functions count, `if TYPE_CHECKING:` ones do not):\n"
                    + "\n".join(describe(c, ROOT) for c in cycles), pytrace=False)


def test_runtime_imports_nothing_above_it() -> None:
    p = project()
    bad = [f"  {imp.path.relative_to(ROOT)}:{imp.line}: imports {imp.target}"
           for imp in p.imports
           if _within(imp.module, "runtime")
           and imp.target.partition(".")[0] in ABOVE_RUNTIME]
    if bad:
        pytest.fail("runtime/ must not depend on " + ", ".join(ABOVE_RUNTIME) + ":\n"
                    + "\n".join(bad), pytrace=False)


# -- the checker itself, on a throwaway tree --------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_and_skips_what_does_not_run(tmp_path: Path) -> None:
    _write(tmp_path, {
        # The package re-exports its submodules: not a cycle.
        "pkg/__init__.py": "from pkg.a import A\nfrom . import b\n",
        # a -> b at module level, b -> a inside a function: a cycle.
        "pkg/a.py": "import pkg.b\nA = 1\n",
        "pkg/b.py": "def f():\n    from .a import A\n    return A\n",
        # c -> d only for the type checker: not a cycle.
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
        "pkg/d.py": "from pkg.c import *\n",
        # A subpackage's __init__ reached through an import of its submodule.
        "pkg/sub/__init__.py": "from pkg.e import E\n",
        "pkg/sub/x.py": "",
        "pkg/e.py": "from pkg.sub import x\nE = 1\n",
    })
    p = scan(tmp_path, ("pkg",))
    cycles = find_cycles(p.edges(type_checking=False))
    found = sorted(tuple([c[0].source] + [e.target for e in c]) for c in cycles)
    assert found == [("pkg.a", "pkg.b", "pkg.a"), ("pkg.e", "pkg.sub", "pkg.e")]
    text = describe(cycles[0], tmp_path)
    assert "pkg/a.py:1" in text and "pkg/b.py:2" in text
    # Counting TYPE_CHECKING imports closes c <-> d as well.
    assert len(find_cycles(p.edges(type_checking=True))) == 3
