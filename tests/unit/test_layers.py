"""The layers of ``testbed/``, enforced on every import (module level and inside
functions, ``TYPE_CHECKING`` blocks included): data flows down, never back up, and
no two modules import each other, directly or round a loop.

    core  <-  hostprog, transport, lab  <-  backends  <-  engine  <-  report  <-  application

The application (cli, api, hosts, pytest_plugin, ansible) reaches a concrete backend
only through the registry; the engine and the reports never name one; no backend
package imports another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import testbed

ROOT = Path(testbed.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "testbed": 0,  # the package's __init__: the version only
    "testbed.core": 0,
    "testbed.hostprog": 1,
    "testbed.transport": 1,
    "testbed.lab": 1,
    "testbed.backends": 2,
    "testbed.engine": 3,
    "testbed.report": 4,
    "testbed.cli": 5,
    "testbed.api": 5,
    "testbed.hosts": 5,
    "testbed.pytest_plugin": 5,
    "testbed.ansible": 5,
    "testbed.commands": 5,
}
BACKEND_API = (
    "testbed.backends",
    "testbed.backends.base",
    "testbed.backends.commands",
    "testbed.backends.registry",
    "testbed.backends.api",
    "testbed.backends.memory",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every testbed module ``path`` imports, anywhere in the file; ``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if _exists(sub) else target)
    return {m for m in found if m == "testbed" or m.startswith("testbed.")}


def _exists(mod: str) -> bool:
    p = ROOT.parent.joinpath(*mod.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def layer_of(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return LAYERS[best]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(ROOT.rglob("*.py"))}


def backend_package(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) >= 3 and parts[1] == "backends" and mod not in BACKEND_API:
        return ".".join(parts[:3])
    return None


def test_every_module_has_a_layer() -> None:
    for mod in graph():
        assert any(mod == k or mod.startswith(k + ".") for k in LAYERS), f"{mod}: give it a layer in LAYERS"


def test_no_import_climbs_a_layer() -> None:
    climbs = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert climbs == []


def test_concrete_backends_are_reached_only_through_the_registry() -> None:
    bad = []
    for a, targets in graph().items():
        for b in targets:
            pb = backend_package(b)
            if pb is None:
                continue
            pa = backend_package(a)
            if pa != pb:
                bad.append(f"{a} imports {b}")
    assert bad == []


def test_no_circles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert loops == []


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from testbed.engine.runner import Runner\n", "climbs"),
        ("def f():\n    from testbed.report import write_reports\n", "climbs"),
    ],
)
def test_the_check_sees_imports_inside_functions(tmp_path: Path, source: str, bad: str) -> None:
    """The checker itself: a core module importing the engine, at module level or inside a
    function, is reported (a check that cannot fail proves nothing)."""
    fake = ROOT / "core" / "_layer_probe.py"
    fake.write_text(source)
    try:
        with pytest.raises(AssertionError):
            test_no_import_climbs_a_layer()
    finally:
        fake.unlink()
