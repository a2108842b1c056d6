"""A host-side program as a zipapp, so a remote host needs only Python 3 (and its
hypervisor).

What goes in is computed, not listed: the closure of testbed modules that the
entry module imports (``modulefinder``), plus the pure-Python libraries the
host side uses (qemu.qmp, platformdirs).  A module that the agent starts to
import and that is not in the closure therefore cannot be forgotten.  The file
is rebuilt only when its sources change; its name is its hash, so an upload is
skipped when the host already has it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import modulefinder
import shutil
import tempfile
import zipapp
from pathlib import Path

import platformdirs
import qemu.qmp

import testbed
from testbed.core.paths import cache_dir

QEMU_AGENT = "testbed.backends.qemu.agent.program"
LIBRARIES = ((qemu.qmp, "qemu/qmp"), (platformdirs, "platformdirs"))


@functools.cache
def closure_of(entry: str) -> tuple[str, ...]:
    """Paths (relative to the testbed package's parent) of every testbed module that
    ``entry`` imports, directly or not, with the package ``__init__`` files."""
    root = Path(testbed.__file__).resolve().parent
    spec = importlib.util.find_spec(entry)
    assert spec is not None and spec.origin is not None, entry
    finder = modulefinder.ModuleFinder(path=[str(root.parent)], excludes=["qemu", "platformdirs"])
    finder.run_script(spec.origin)
    files: set[str] = set()
    for mod in finder.modules.values():
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(root):
            rel = Path(f).resolve().relative_to(root.parent)
            files.add(str(rel))
            for parent in rel.parents:  # every package on the way has its __init__
                init = root.parent / parent / "__init__.py"
                if parent != Path(".") and init.exists():
                    files.add(str(parent / "__init__.py"))
    files.add(str(Path(spec.origin).resolve().relative_to(root.parent)))
    return tuple(sorted(files))


def _sources(entry: str) -> dict[str, Path]:
    base = Path(testbed.__file__).resolve().parent.parent
    files = {rel: base / rel for rel in closure_of(entry)}
    for pkg, top in LIBRARIES:
        lib = Path(pkg.__file__ or "").parent
        for p in sorted(lib.rglob("*.py")):
            files[f"{top}/{p.relative_to(lib)}"] = p
    spec = importlib.util.find_spec("qemu")
    if spec and spec.submodule_search_locations:
        init = Path(list(spec.submodule_search_locations)[0]) / "__init__.py"
        if init.exists():
            files["qemu/__init__.py"] = init
    return files


def build_pyz(entry: str = QEMU_AGENT) -> Path:
    """The zipapp of ``entry`` (a module with ``main()``), cached by content hash."""
    files = _sources(entry)
    h = hashlib.sha256(entry.encode())
    for name, path in sorted(files.items()):
        h.update(name.encode() + b"\0" + path.read_bytes())
    digest = h.hexdigest()[:16]
    out = cache_dir() / "agent" / f"{entry.rsplit('.', 1)[-1]}-{digest}.pyz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "app"
        for name, path in files.items():
            dest = stage / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        (stage / "__main__.py").write_text(f"from {entry} import main\n\nmain()\n")
        part = out.with_suffix(".part")
        zipapp.create_archive(stage, part, interpreter="/usr/bin/env python3")
        part.replace(out)
    return out
