"""The QEMU backend on real guests: boot, talk over virtio-serial, power off, panic, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.backends.qemu.backend import QemuBackend
from testbed.backends.qemu.image import build_image
from testbed.core.config import VmConfig
from testbed.core.evidence import RacePlan
from testbed.core.paths import runtime_dir
from testbed.hostprog import leases

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend() -> Iterator[QemuBackend]:
    with QemuBackend() as b:
        yield b


def test_image_build_is_cached_by_inputs(ref_cfg: VmConfig) -> None:
    a = build_image(ref_cfg)
    mtime = (a.directory / "manifest.json").stat().st_mtime
    b = build_image(ref_cfg)
    assert a.key == b.key and (b.directory / "manifest.json").stat().st_mtime == mtime  # a hit, not a rebuild
    assert a.manifest["modules"].split(",")[:6] == [
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_console",
    ]
    other = build_image(ref_cfg.model_copy(update={"cmdline": ref_cfg.cmdline + " tb.test=1"}))
    assert other.key != a.key


def test_boot_read_kernel_over_virtio_serial_and_poweroff(backend: QemuBackend, ref_cfg: VmConfig) -> None:
    vm = backend.provision(ref_cfg)
    try:
        ready = backend.start(vm, reset="cold")
        assert ready["guest_image"] == "v2"
        info = backend.uname(vm)
        assert info["release"] == vm.image.manifest["kernel_release"]
        assert info["machine"] == "x86_64"
        backend.powerdown(vm)  # ACPI power button -> the guest powers itself off
        outcome = backend.wait_outcome(vm, 60)
        assert outcome["ended"] and outcome["reason"] == "guest-shutdown"
        assert any("VTL0 power-button" in ln for ln in outcome["serial"])
    finally:
        backend.destroy(vm)


def test_guest_panic_gives_guest_panic(backend: QemuBackend, ref_cfg: VmConfig) -> None:
    vm = backend.provision(ref_cfg)
    try:
        backend.start(vm, reset="cold")
        res = backend.race(
            vm, RacePlan(0, None, service=True, shutdown=False, image="v2-panic"), grace_ms=3000
        ).raw
        assert res["ended"] and res["shutdown"]["data"]["reason"] == "guest-panic"
        assert any(e["event"] == "GUEST_PANICKED" for e in res["qmp_events"])
    finally:
        backend.destroy(vm)


def test_destroy_leaves_no_process_and_no_lease(backend: QemuBackend, ref_cfg: VmConfig) -> None:
    vm = backend.provision(ref_cfg)
    backend.start(vm, reset="cold")
    mine = [
        lease for _p, lease in leases.read_all(runtime_dir() / "leases") if lease and lease.name == vm.name
    ]
    assert len(mine) == 1
    pid = mine[0].qemu_pid
    assert leases.alive(pid, mine[0].qemu_start)
    backend.destroy(vm)
    assert not Path(f"/proc/{pid}").exists()
    assert not [
        lease for _p, lease in leases.read_all(runtime_dir() / "leases") if lease and lease.name == vm.name
    ]


OWNER = textwrap.dedent("""
    import json, os, sys, time
    from testbed.backends.qemu.backend import QemuBackend
    from testbed.engine.playbook import load_vm_config
    b = QemuBackend()
    vm = b.provision(load_vm_config(sys.argv[1]))
    b.start(vm, reset="cold")
    print(json.dumps({"agent": b.host_info["pid"], "name": vm.name}), flush=True)
    time.sleep(600)
""")


def start_owner() -> tuple[subprocess.Popen[str], dict[str, object], leases.Lease]:
    p = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(ROOT / "vm_configs/reference-linux.yaml")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None
    info = json.loads(p.stdout.readline())
    lease = next(
        lease
        for _p, lease in leases.read_all(runtime_dir() / "leases")
        if lease and lease.name == info["name"]
    )
    assert leases.alive(lease.qemu_pid, lease.qemu_start)
    return p, info, lease


def wait_gone(pid: int, started: int | None, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not leases.alive(pid, started):
            return True
        time.sleep(0.05)
    return False


def test_killed_testbed_process_dead_man_switch() -> None:
    """SIGKILL the testbed process only: its agent sees stdin close and destroys QEMU."""
    p, info, lease = start_owner()
    p.kill()
    p.wait()
    assert wait_gone(lease.qemu_pid, lease.qemu_start)
    assert wait_gone(int(info["agent"]), None)  # type: ignore[arg-type]
    assert not (runtime_dir() / "leases" / lease.path_name).exists()


def test_killed_process_tree_leaves_a_lease_that_gc_cleans() -> None:
    """SIGKILL the testbed process and its agent at once: the lease stays; gc reaps it."""
    p, info, lease = start_owner()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert wait_gone(lease.qemu_pid, lease.qemu_start)  # PDEATHSIG: QEMU dies with its agent
    assert (runtime_dir() / "leases" / lease.path_name).exists()
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "gc"], capture_output=True, text=True)
    assert r.returncode == 0 and f"removed lease {lease.path_name}" in r.stdout
    assert not (runtime_dir() / "leases" / lease.path_name).exists()


def test_gc_kills_a_live_qemu_whose_owner_is_dead(tmp_path: Path) -> None:
    q = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-S", "-nodefaults"],
        start_new_session=True,
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease_dir = runtime_dir() / "leases"
    leases.write(
        lease_dir,
        leases.Lease(
            "orphan", q.pid, leases.start_time(q.pid), dead.pid, None, str(tmp_path / "wd"), time.time()
        ),
    )
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "gc"], capture_output=True, text=True)
    assert f"killed QEMU pid {q.pid}" in r.stdout
    assert q.wait(timeout=10) is not None


@pytest.mark.parametrize("failure", ["abort", "hang"])
def test_kvm_probe_falls_back_to_tcg(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref_cfg: VmConfig
) -> None:
    """A KVM that aborts the guest (MSR assertion) or hangs it must give TCG, with the reason."""
    wrapper = tmp_path / "qemu-wrapper"
    bad = "echo 'failed to set MSR 0x10a' >&2; exit 134" if failure == "abort" else "exec sleep 600"
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" -accel kvm "*) {bad};; esac\nexec qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("TESTBED_QEMU_BINARY", str(wrapper))
    monkeypatch.setenv("TESTBED_KVM_PROBE_CACHE", str(tmp_path / "probe.json"))
    monkeypatch.setenv("TESTBED_KVM_PROBE_TIMEOUT", "3")
    import testbed.backends.qemu.backend as mod

    monkeypatch.setattr(mod, "PROBE_TIMEOUT_S", 3.0)
    with QemuBackend() as b:
        img = build_image(ref_cfg)
        accel, reason = b.resolve_accel(ref_cfg.model_copy(update={"accel": "auto"}), img)
        assert accel == "tcg"
        assert ("MSR" in reason) if failure == "abort" else ("hung" in reason or "did not reach" in reason)
        cached = json.loads((tmp_path / "probe.json").read_text())
        assert cached["ok"] is False  # cached per host, with its time for expiry
        vm = b.provision(ref_cfg.model_copy(update={"accel": "auto"}))
        try:
            assert vm.accel == "tcg"
            b.start(vm, reset="cold")  # the fallback really boots (through the wrapper, under TCG)
        finally:
            b.destroy(vm)


def test_image_export_and_import_into_another_cache(ref_cfg: VmConfig, tmp_path: Path) -> None:
    img = build_image(ref_cfg)
    archive = tmp_path / "image.tar.gz"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "image", "export", str(archive)],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other-cache"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "image", "import", str(archive)], capture_output=True,
                       text=True, env={**os.environ, "TESTBED_CACHE_DIR": str(other)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"imported image {img.key}" in r.stdout
    assert (other / "images" / img.key / "initrd.cpio").read_bytes() == img.initrd.read_bytes()
