"""What runs on lab hosts: each host-side program's zipapp carries exactly its import
closure, starts under a plain python3 with none of testbed's dependencies installed,
and stays valid on the oldest Python we support on hosts (3.9, Debian 11)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.hostprog.bundle import QEMU_AGENT, build_pyz, closure_of

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = [QEMU_AGENT, "testbed.backends.openvmm.hostside"]


@pytest.mark.parametrize("entry", PROGRAMS)
def test_the_closure_is_small_and_free_of_controller_code(entry: str) -> None:
    files = closure_of(entry)
    assert not any(
        f.endswith(("config.py", "cli.py", "client.py", "bundle.py", "backend.py")) for f in files
    ), files


@pytest.mark.parametrize("entry", PROGRAMS)
def test_zipapp_says_hello_under_a_bare_python3(entry: str) -> None:
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else shutil.which("python3")
    assert py is not None
    r = subprocess.run([py, "-I", str(build_pyz(entry))], input='{"id": 1, "op": "hello", "args": {}}\n',
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    reply = json.loads(r.stdout.splitlines()[0])
    assert reply["ok"] and reply["result"]["pid"] > 0, r.stderr


@pytest.mark.parametrize("entry", PROGRAMS)
def test_the_closure_is_python_3_9(entry: str) -> None:
    files = [str(ROOT / f) for f in closure_of(entry)]
    r = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check",
                        "--target-version", "py39", "--select", "UP,F", "--no-cache", *files],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
