"""The QEMU backend: reference-lab guests on this machine, driven through the host agent.

Accelerator ``auto`` probes KVM once by booting the reference guest with a
short timeout (``/dev/kvm`` existing proves nothing on these machines) and
caches the verdict per host with an expiry; TCG and KVM results are never
pooled because the accelerator is part of every VM record and snapshot key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import leases
from testbed.backends.base import Check, HostReport, RacePlan
from testbed.backends.qemu.client import AgentClient, AgentFailure, AgentLost
from testbed.backends.qemu.image import Image, ImageBuildError, build_image, resolve_kernel
from testbed.config import VmConfig
from testbed.paths import cache_dir, runtime_dir
from testbed.slots import GuestSlot

log = logging.getLogger(__name__)

PROBE_TTL_S = 24 * 3600
PROBE_TIMEOUT_S = float(os.environ.get("TESTBED_KVM_PROBE_TIMEOUT", "15"))
_names = itertools.count(1)


class InfraError(Exception):
    """The testbed or the host failed; never a product verdict."""


@dataclass
class QemuVm:
    """A VM record: everything that shapes the guest, recorded with every result."""

    name: str
    cfg: VmConfig
    image: Image
    accel: str
    qemu_version: str
    strategy: str
    workdir: Path
    running: bool = False
    slot: GuestSlot | None = None
    boot: dict[str, Any] = field(default_factory=dict)

    def spec(self, incoming: Path | None = None) -> dict[str, Any]:
        return {
            "machine": self.cfg.machine,
            "accel": self.accel,
            "memory_mib": self.cfg.memory_mib,
            "cpus": self.cfg.cpus,
            "kernel": str(self.image.kernel),
            "initrd": str(self.image.initrd),
            "cmdline": guest_cmdline(self.cfg),
            "strategy": self.strategy,
            "incoming": str(incoming) if incoming else None,
        }

    def record(self) -> dict[str, Any]:
        return {
            "vm": self.name,
            "vm_config": self.cfg.name,
            "accel": self.accel,
            "qemu_version": self.qemu_version,
            "kernel": self.image.manifest.get("kernel_release", ""),
            "kernel_package": f"{self.image.manifest.get('kernel_package')}={self.image.manifest.get('kernel_version')}",
            "image_key": self.image.key,
            "paravisor": self.cfg.paravisor.version,
            "strategy": self.strategy,
        }


def guest_cmdline(cfg: VmConfig) -> str:
    return f"{cfg.cmdline} tb.pv={cfg.paravisor.version} tb.shutdown_ms={cfg.lab.vtl0_shutdown_ms}"


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
    except FileNotFoundError:
        return ""
    return out.splitlines()[0].removeprefix("QEMU emulator version ").strip() if out else ""


class QemuBackend:
    """Local QEMU host. One agent subprocess serves all VMs of this backend."""

    kind = "qemu"

    def __init__(self) -> None:
        self._agent: AgentClient | None = None
        self.host = "local"

    # ---- agent -------------------------------------------------------------
    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            self._agent = AgentClient.spawn_local()
            self._agent.call("hello", timeout=30)
        return self._agent

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def __enter__(self) -> QemuBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- accelerator ---------------------------------------------------------
    def resolve_accel(self, cfg: VmConfig, image: Image, refresh: bool = False) -> tuple[str, str]:
        """(accel, reason). ``auto``: probe KVM once per host (cached, with expiry)."""
        if cfg.accel != "auto":
            return cfg.accel, "set in the vm_config"
        probe = self.kvm_probe(image, refresh=refresh)
        if probe["ok"]:
            return "kvm", probe["reason"]
        (log.info if probe.get("cached") else log.warning)(
            "KVM unusable, falling back to TCG: %s", probe["reason"]
        )
        return "tcg", f"KVM probe failed: {probe['reason']}"

    def kvm_probe(self, image: Image, refresh: bool = False) -> dict[str, Any]:
        path = Path(os.environ.get("TESTBED_KVM_PROBE_CACHE") or cache_dir() / "kvm-probe.json")
        qv = qemu_version()
        if path.exists() and not refresh:
            cached = json.loads(path.read_text())
            if time.time() - cached["time"] < PROBE_TTL_S and cached.get("qemu") == qv:
                return {**cached, "cached": True}
        wd = runtime_dir() / "probe" / str(os.getpid())
        spec = {
            "machine": "q35",
            "accel": "kvm",
            "memory_mib": 128,
            "cpus": 1,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": "console=ttyS0 quiet panic=-1 tb.pv=v2",
        }
        try:
            res = self.agent.call(
                "probe_kvm",
                timeout=PROBE_TIMEOUT_S + 30,
                spec=spec,
                workdir=str(wd),
                timeout_s=PROBE_TIMEOUT_S,
            )
        except AgentFailure as e:
            res = {"ok": False, "reason": str(e)}
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        result = {
            "ok": bool(res.get("ok")),
            "reason": res.get("reason", ""),
            "time": time.time(),
            "qemu": qv,
        }
        path.write_text(json.dumps(result))
        return result

    # ---- preflight -----------------------------------------------------------
    def preflight(self, cfg: VmConfig | None = None) -> HostReport:
        rep = HostReport(self.host)
        qv = qemu_version()
        rep.checks.append(
            Check("qemu", bool(qv), qv or "qemu-system-x86_64 not found", "apt-get install qemu-system-x86")
        )
        for tool, pkg in (("gcc", "gcc libc6-dev"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
            found = shutil.which(tool)
            rep.checks.append(
                Check(tool, bool(found), found or f"{tool} not found", f"apt-get install {pkg}")
            )
        libc_a = any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libc.a", "/usr/lib/libc.a"))
        rep.checks.append(
            Check(
                "static libc",
                libc_a,
                "libc.a present" if libc_a else "no libc.a for -static",
                "apt-get install libc6-dev",
            )
        )
        cfg = cfg or VmConfig(name="preflight")
        try:
            kpkg, kver = resolve_kernel(cfg.kernel.package, cfg.kernel.version)
            rep.checks.append(Check("kernel package", True, f"{kpkg}={kver}"))
        except ImageBuildError as e:
            rep.checks.append(Check("kernel package", False, str(e), "apt-get update"))
        free = shutil.disk_usage(cache_dir()).free
        rep.checks.append(
            Check(
                "disk",
                free > 2 << 30,
                f"{free / 2**30:.1f} GiB free in {cache_dir()}",
                "free at least 2 GiB in the cache dir (TESTBED_CACHE_DIR)",
            )
        )
        kvm = Path("/dev/kvm")
        cached = Path(os.environ.get("TESTBED_KVM_PROBE_CACHE") or cache_dir() / "kvm-probe.json")
        if cached.exists():
            p = json.loads(cached.read_text())
            rep.checks.append(
                Check(
                    "kvm probe",
                    True,
                    f"{'usable' if p['ok'] else 'unusable (TCG fallback)'}: {p['reason']}",
                )
            )
        else:
            rep.checks.append(
                Check(
                    "kvm probe",
                    True,
                    f"not probed yet; /dev/kvm {'exists' if kvm.exists() else 'missing'} (TCG works either way)",
                )
            )
        return rep

    # ---- lifecycle -----------------------------------------------------------
    def provision(self, cfg: VmConfig, strategy: str = "none") -> QemuVm:
        try:
            image = build_image(cfg)
        except ImageBuildError as e:
            raise InfraError(f"image build failed: {e}") from None
        accel, reason = self.resolve_accel(cfg, image)
        name = f"{cfg.name}-{os.getpid()}-{next(_names)}"
        vm = QemuVm(name, cfg, image, accel, qemu_version(), strategy, runtime_dir() / "vms" / name)
        vm.boot["accel_reason"] = reason
        return vm

    def start(self, vm: QemuVm, reset: str = "cold") -> dict[str, Any]:
        """Boot the VM to the point where the shutdown IC is offered.

        ``reset="snapshot"`` restores a snapshot taken at READY (made once and
        cached, keyed by everything that shapes it); ``"cold"`` boots.
        """
        incoming = self.ensure_snapshot(vm) if reset == "snapshot" else None
        if vm.slot is None:
            vm.slot = GuestSlot().acquire()
        t = time.monotonic()
        try:
            if vm.workdir.exists():
                shutil.rmtree(vm.workdir)
            self.agent.call(
                "launch",
                name=vm.name,
                workdir=str(vm.workdir),
                lease_dir=str(runtime_dir() / "leases"),
                spec=vm.spec(incoming),
                owner_pid=os.getpid(),
            )
            vm.running = True
            ready = self.agent.call(
                "wait_ready",
                timeout=vm.cfg.boot_timeout_s + 30,
                name=vm.name,
                timeout_s=vm.cfg.boot_timeout_s,
                incoming=incoming is not None,
            )
        except (AgentFailure, AgentLost) as e:
            self.destroy(vm)
            raise InfraError(f"start of {vm.name} failed: {e}") from None
        ready["wall_s"] = time.monotonic() - t
        ready["reset"] = reset
        return ready

    def snapshot_key(self, vm: QemuVm) -> str:
        blob = json.dumps({**vm.spec(), "image": vm.image.key, "qemu": vm.qemu_version, "strategy": None})
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def ensure_snapshot(self, vm: QemuVm) -> Path:
        path = cache_dir() / "snapshots" / f"{self.snapshot_key(vm)}.mig"
        if path.exists():
            return path
        path.parent.mkdir(exist_ok=True)
        maker = QemuVm(
            vm.name + "-snap",
            vm.cfg,
            vm.image,
            vm.accel,
            vm.qemu_version,
            vm.strategy,
            vm.workdir.with_name(vm.workdir.name + "-snap"),
        )
        try:
            self.start(maker, reset="cold")
            self.agent.call("snapshot", name=maker.name, path=str(path), timeout=120)
        except AgentFailure as e:
            raise InfraError(f"snapshot failed: {e}") from None
        finally:
            self.destroy(maker)
        return path

    def uname(self, vm: QemuVm) -> dict[str, Any]:
        return self.agent.call("uname", name=vm.name, timeout_s=10)

    def powerdown(self, vm: QemuVm) -> None:
        self.agent.call("powerdown", name=vm.name)

    def wait_outcome(self, vm: QemuVm, timeout: float) -> dict[str, Any]:
        return self.agent.call("wait_outcome", timeout=timeout + 30, name=vm.name, timeout_s=timeout)

    def race(self, vm: QemuVm, plan: RacePlan, grace_ms: float) -> dict[str, Any]:
        """Fire one iteration on the host (inside the agent) and return its evidence."""
        knobs = vm.cfg.lab
        service = None
        if plan.service:
            service = {
                "id": plan.iteration + 1,
                "image": plan.image or vm.cfg.paravisor.version,
                "knobs": {
                    "save_ms": knobs.save_ms,
                    "restore_ms": knobs.restore_ms,
                    "blackout_ms": knobs.blackout_ms,
                },
            }
        shutdown = None
        if plan.shutdown:
            shutdown = {
                "id": f"sd{plan.iteration}",
                "reason": "testbed",
                "mode": plan.shutdown_mode,
                "offset_ms": plan.offset_ms if plan.offset_ms is not None else 0.0,
            }
        budget = (knobs.servicing_timeout_ms + grace_ms) / 1000 + 60
        return self.agent.call(
            "race",
            timeout=budget,
            name=vm.name,
            service=service,
            shutdown=shutdown,
            grace_ms=grace_ms,
            servicing_timeout_ms=knobs.servicing_timeout_ms,
        )

    def collect(self, vm: QemuVm, dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for name in ("serial.log", "qemu.stderr", "qemu.argv.json"):
            src = vm.workdir / name
            if src.exists():
                shutil.copy2(src, dest / name)
                out.append(dest / name)
        return out

    def destroy(self, vm: QemuVm) -> None:
        """Never leaves a process: the agent escalates quit -> SIGTERM -> SIGKILL."""
        try:
            if vm.running and self._agent is not None:
                self._agent.call("destroy", name=vm.name, timeout=30)
        except (AgentFailure, AgentLost) as e:
            log.warning("destroy of %s through the agent failed (%s); reaping its lease", vm.name, e)
            for path, lease in leases.read_all(runtime_dir() / "leases"):
                if lease is not None and lease.name == vm.name:
                    leases.kill_group(lease.qemu_pid, lease.qemu_start)
                    path.unlink(missing_ok=True)
        finally:
            vm.running = False
            shutil.rmtree(vm.workdir, ignore_errors=True)
            if vm.slot is not None:
                vm.slot.release()
                vm.slot = None
