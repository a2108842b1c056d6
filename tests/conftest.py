"""Shared fixtures. VM tests boot real QEMU guests (marked ``vm``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import leases
from testbed.config import VmConfig, load_vm_config

ROOT = Path(__file__).resolve().parent.parent


def qemu_pids() -> set[int]:
    """Live QEMU processes (a zombie waiting for a reaper is dead, not leaked)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text()
            except OSError:
                continue
            if comm.startswith("qemu-system") and leases.alive(int(d.name), None):
                pids.add(int(d.name))
    return pids


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
