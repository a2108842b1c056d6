"""The host agent as a zipapp, so a remote host needs only Python 3 (and QEMU).

It carries the agent, the stdlib-only pieces it uses (relay, leases, paths,
slots) and the pure-Python libraries it needs (qemu.qmp, platformdirs).  The
file is rebuilt only when its sources change; its name is its hash, so an
upload is skipped when the host already has it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
import zipapp
from pathlib import Path

import platformdirs
import qemu.qmp

import testbed
from testbed.paths import cache_dir

MODULES = ("__init__.py", "agent/__init__.py", "agent/__main__.py", "agent/agent.py", "lab/__init__.py",
           "lab/relay.py", "leases.py", "paths.py", "slots.py")  # fmt: skip


def _sources() -> dict[str, Path]:
    root = Path(testbed.__file__).parent
    files = {f"testbed/{m}": root / m for m in MODULES}
    for pkg, top in ((qemu.qmp, "qemu/qmp"), (platformdirs, "platformdirs")):
        base = Path(pkg.__file__ or "").parent
        for p in sorted(base.rglob("*.py")):
            files[f"{top}/{p.relative_to(base)}"] = p
    spec = importlib.util.find_spec("qemu")
    if spec and spec.submodule_search_locations:
        init = Path(list(spec.submodule_search_locations)[0]) / "__init__.py"
        if init.exists():
            files["qemu/__init__.py"] = init
    return files


def build_agent_pyz() -> Path:
    files = _sources()
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(name.encode() + b"\0" + path.read_bytes())
    digest = h.hexdigest()[:16]
    out = cache_dir() / "agent" / f"testbed-agent-{digest}.pyz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "app"
        for name, path in files.items():
            dest = stage / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        (stage / "__main__.py").write_text("from testbed.agent.agent import main\n\nmain()\n")
        part = out.with_suffix(".part")
        zipapp.create_archive(stage, part, interpreter="/usr/bin/env python3")
        part.replace(out)
    return out
