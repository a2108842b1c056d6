"""One job per function and per file: no function over 60 lines in the engine, the
backends and the CLI, no file over 500 lines anywhere in testbed (the PowerShell module
and the lab's C are not Python and not counted). A long function is where the next
feature's bug hides; split it by job, not at an arbitrary line."""

from __future__ import annotations

import ast
from pathlib import Path

import testbed

ROOT = Path(testbed.__file__).resolve().parent
FUNCTION_LIMIT = 60
FILE_LIMIT = 500


def _checked(p: Path, root: Path) -> bool:
    rel = p.relative_to(root).as_posix()
    return rel.startswith(("engine/", "backends/", "commands/")) or rel == "cli.py"


def long_functions(root: Path = ROOT) -> list[str]:
    out = []
    for p in sorted(root.rglob("*.py")):
        if not _checked(p, root):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LIMIT:
                    out.append(f"{p.relative_to(root)}::{node.name} is {n} lines")
    return out


def long_files(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)} is {n} lines" for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > FILE_LIMIT]  # fmt: skip


def test_no_function_over_60_lines() -> None:
    assert long_functions() == []


def test_no_file_over_500_lines() -> None:
    assert long_files() == []


def test_the_checks_can_fail(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "engine" / "long.py").write_text(f"def f():\n{body}\n" + "\n" * 440)
    assert long_functions(tmp_path) == ["engine/long.py::f is 62 lines"]
    assert long_files(tmp_path) == ["engine/long.py is 502 lines"]
