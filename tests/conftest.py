"""Shared fixtures. VM tests boot real QEMU guests (marked ``vm``)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.core.config import VmConfig
from testbed.engine.playbook import load_vm_config
from testbed.hostprog import leases

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def _live_pids(match: Callable[[Path], bool]) -> set[int]:
    """Live processes whose /proc folder ``match`` accepts (a zombie waiting for a reaper
    is dead, not leaked)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if not match(d):
                    continue
            except OSError:
                continue
            if leases.alive(int(d.name), None):
                pids.add(int(d.name))
    return pids


def qemu_pids() -> set[int]:
    """Live QEMU processes."""
    return _live_pids(lambda d: (d / "comm").read_text().startswith("qemu-system"))


def standin_pids() -> set[int]:
    """Live stand-in openvmm processes (tests/openvmm_standin.py, run by python)."""
    return _live_pids(
        lambda d: any(a.endswith(b"openvmm_standin.py") for a in (d / "cmdline").read_bytes().split(b"\0"))
    )


@pytest.fixture(scope="session")
def ref_cfg() -> VmConfig:
    return load_vm_config(ROOT / "vm_configs" / "reference-linux.yaml")


@pytest.fixture(autouse=True)
def no_leaked_qemu(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every VM test must leave no QEMU and no (stand-in) openvmm behind (checked by pid,
    not by trust)."""
    if request.node.get_closest_marker("vm") is None:
        yield
        return
    before = qemu_pids() | standin_pids()
    yield
    leaked = qemu_pids() - before
    deadline = time.monotonic() + 5.0  # an openvmm told to quit may take a moment to exit
    while (standin := standin_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked |= standin
    detail = {p: _describe(p) for p in leaked}
    assert not leaked, f"test leaked QEMU or openvmm processes: {detail}"


def _describe(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:
        return "gone"
    return f"ppid {ppid}: " + " ".join(a.decode() for a in args if b"/" in a)[:300]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real OpenSSH server on loopback (Debian's openssh-server)."""
    import shutil

    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None:
        pytest.fail("openssh-server is not installed: apt-get install openssh-server")
    from sshd import run_sshd  # type: ignore[import-not-found]

    with run_sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


# ---- CI guard: a run that silently skipped its VM tests must not go green ----------
# Registered as a plugin (not as conftest hooks) because conftest hooks only see items
# under tests/, and the lab suite in suites/ has VM tests too.


class _VmTestGuard:
    def __init__(self) -> None:
        self.passed: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed and "vm" in report.keywords:
            self.passed.append(report.nodeid)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """With TESTBED_MIN_VM_TESTS set (.ci/run sets it), fewer passing VM tests fails the run."""
        import os

        want = int(os.environ.get("TESTBED_MIN_VM_TESTS", "0"))
        if not want:
            return
        print(f"\n{len(self.passed)} VM tests passed (TESTBED_MIN_VM_TESTS={want})")
        if len(self.passed) < want and exitstatus == 0:
            session.exitstatus = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Hunts (minutes of guests, a statistical answer) run when asked: TESTBED_HUNTS=1."""
    if os.environ.get("TESTBED_HUNTS") == "1":
        return
    for item in items:
        if item.get_closest_marker("hunt"):
            item.add_marker(
                pytest.mark.skip(reason="a statistical hunt: run with TESTBED_HUNTS=1 (or bench/)")
            )


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the xdist controller sees every report
        config.pluginmanager.register(_VmTestGuard(), "testbed-vm-test-guard")
