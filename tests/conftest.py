"""Shared fixtures. VM tests boot real QEMU guests (marked ``vm``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import leases

from testbed.config import VmConfig, load_vm_config

ROOT = Path(__file__).resolve().parent.parent


def qemu_pids() -> set[int]:
    """Live QEMU processes (a zombie waiting for a reaper is dead, not leaked)."""
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split() if leases.alive(int(p), None)}


@pytest.fixture(scope="session")
def ref_cfg() -> VmConfig:
    return load_vm_config(ROOT / "vm_configs" / "reference-linux.yaml")


@pytest.fixture(autouse=True)
def no_leaked_qemu(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every VM test must leave no QEMU behind (checked by pid, not by trust)."""
    if request.node.get_closest_marker("vm") is None:
        yield
        return
    before = qemu_pids()
    yield
    leaked = qemu_pids() - before
    assert not leaked, f"test leaked QEMU processes: {sorted(leaked)}"
