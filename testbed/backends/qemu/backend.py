"""The QEMU backend: reference-lab guests on this machine or a Linux host over SSH.

Everything that runs next to QEMU is the host agent's job; this class only
talks to it through a transport (a local subprocess, or an SSH exec channel
running the agent zipapp), uploads the image when the host lacks it, and
turns failures into ``InfraError``.

Accelerator ``auto`` probes KVM once by booting the reference guest with a
short timeout (``/dev/kvm`` existing proves nothing on these machines) and
caches the verdict per host with an expiry; TCG and KVM results are never
pooled because the accelerator is part of every VM record and snapshot key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.base import host_program_errors
from testbed.backends.qemu import evidence
from testbed.backends.qemu.agent.lifecycle import SLOT_WAIT_S
from testbed.backends.qemu.capabilities import CAPABILITIES
from testbed.backends.qemu.config import QemuVmConfig
from testbed.backends.qemu.image import Image, ImageBuildError, build_image, resolve_kernel
from testbed.core.errors import InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan
from testbed.core.paths import cache_dir, runtime_dir
from testbed.core.verdicts import Verdict
from testbed.hostprog import leases
from testbed.hostprog.client import HostProgram
from testbed.transport import LocalTransport, Transport, TransportError

log = logging.getLogger(__name__)

PROBE_TTL_S = 24 * 3600
PROBE_FORMAT = 2  # 2: CPU models tried in turn (cpu, attempts); older verdicts are probed again
PROBE_TIMEOUT_S = float(os.environ.get("TESTBED_KVM_PROBE_TIMEOUT", "15"))
_names = itertools.count(1)


@dataclass
class QemuVm:
    """A VM record: everything that shapes the guest, recorded with every result."""

    name: str
    cfg: QemuVmConfig
    image: Image
    accel: str
    qemu_version: str
    strategy: str
    workdir: str  # on the host
    host_kernel: str
    host_initrd: str
    host: str = "local"
    running: bool = False
    boot: dict[str, Any] = field(default_factory=dict)
    incoming: str | None = None  # the snapshot the running VM was restored from
    qemu_binary: str | None = None  # None: the host agent finds it
    qemu_action: bool = True  # QEMU has -action (6.0+)
    cpu_model: str | None = None  # under KVM: the model the probe found to boot (None: host)

    def spec(self, incoming: str | None = None) -> dict[str, Any]:
        return {
            "machine": self.cfg.machine,
            "accel": self.accel,
            "memory_mib": self.cfg.memory_mib,
            "cpus": self.cfg.cpus,
            "kernel": self.host_kernel,
            "initrd": self.host_initrd,
            "cmdline": guest_cmdline(self.cfg),
            "strategy": self.strategy,
            "incoming": str(incoming) if incoming else None,
            "qemu": self.qemu_binary,
            "action": self.qemu_action,
            "cpu_model": self.cpu_model,
        }

    def record(self) -> dict[str, Any]:
        return {
            "vm": self.name,
            "host": self.host,
            "vm_config": self.cfg.name,
            "accel": self.accel,
            "qemu_version": self.qemu_version,
            "kernel": self.image.manifest.get("kernel_release", ""),
            "kernel_package": f"{self.image.manifest.get('kernel_package')}={self.image.manifest.get('kernel_version')}",
            "image_key": self.image.key,
            "paravisor": self.cfg.paravisor.version,
            "strategy": self.strategy,
            "image_hash": self.image.manifest.get("initrd_sha256"),
            "accel_reason": self.boot.get("accel_reason"),
        }


def guest_cmdline(cfg: QemuVmConfig) -> str:
    return f"{cfg.cmdline} tb.pv={cfg.paravisor.version} tb.shutdown_ms={cfg.lab.vtl0_shutdown_ms}"


def _short_qemu_version(line: str) -> str:
    return line.removeprefix("QEMU emulator version ").strip()


class QemuBackend:
    """A QEMU host (local or over SSH). One agent serves all VMs of this backend."""

    kind = "qemu"
    capabilities = CAPABILITIES

    def __init__(
        self,
        transport: Transport | None = None,
        qemu_binary: str | None = None,
        max_guests: int | None = None,
    ) -> None:
        self.transport: Transport = transport or LocalTransport()
        self.qemu_binary = qemu_binary  # an inventory entry's qemu_binary; None: found on the host
        self.max_guests = max_guests  # an inventory entry's max_guests; None: the host's own limit
        self._qemu: dict[str, Any] | None = None
        self.host = self.transport.name
        self.program = HostProgram(self.transport, "testbed.backends.qemu.agent.program")

    # ---- agent -------------------------------------------------------------
    def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """One agent request; the agent's and the route's failures become InfraError
        (named by type, so a lost channel reads differently from a refused op)."""
        with host_program_errors():
            return self.program.call(op, timeout=timeout, **args)

    @property
    def host_info(self) -> dict[str, Any]:
        """The agent's hello (started now if needed): where the host keeps things."""
        with host_program_errors():
            self.program.client  # noqa: B018 (starting it is the point)
        return self.program.hello

    def close(self) -> None:
        """Close the agent's stdin: it destroys its VMs and exits."""
        self.program.close()

    def __enter__(self) -> QemuBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_path(self, kind: str, *parts: str) -> str:
        """A path on the host under its cache or runtime dir."""
        base = str(self.host_info[f"{kind}_dir"])
        return "/".join([base, *parts])

    def qemu_info(self) -> dict[str, Any]:
        """The host's QEMU: binary, version, whether it has -action (asked once)."""
        if self._qemu is None:
            try:
                self._qemu = self.call("qemu_version", timeout=30, qemu=self.qemu_binary)
            except InfraError as e:
                return {"version": "", "binary": self.qemu_binary, "action": True, "error": str(e)}
        return self._qemu

    def qemu_version(self) -> str:
        return _short_qemu_version(str(self.qemu_info()["version"]))

    def upload_image(self, image: Image) -> tuple[str, str]:
        """The kernel and initrd on the host (uploaded once; skipped when the hash matches)."""
        if self.transport.is_local:
            return str(image.kernel), str(image.initrd)
        paths = []
        for f in (image.kernel, image.initrd):
            remote = self.host_path("cache", "images", image.key, f.name)
            try:
                self.transport.put(f, remote)
            except TransportError as e:
                raise InfraError(f"image upload: {e}") from None
            paths.append(remote)
        return paths[0], paths[1]

    # ---- accelerator ---------------------------------------------------------
    def resolve_accel(self, cfg: QemuVmConfig, image: Image, refresh: bool = False) -> tuple[str, str]:
        """(accel, reason). ``auto``: probe KVM once per host (cached, with expiry); the CPU
        model that booted is the cached verdict's ``cpu`` (``provision`` gives it the VM)."""
        if cfg.accel != "auto":
            return cfg.accel, "set in the vm_config"
        probe = self.kvm_probe(image, refresh=refresh)
        if probe["ok"]:
            return "kvm", probe["reason"]
        if probe.get("kind") == "qemu-args":
            log.error("the KVM probe could not run: %s", probe["reason"])
            return "tcg", f"KVM not probed: {probe['reason']}"
        (log.info if probe.get("cached") else log.warning)(
            "KVM unusable, falling back to TCG: %s", probe["reason"]
        )
        return "tcg", f"KVM probe failed: {probe['reason']}"

    def probe_cache_path(self) -> Path:
        """Per host: a KVM verdict of one host says nothing about another."""
        if env := os.environ.get("TESTBED_KVM_PROBE_CACHE"):
            return Path(env)
        tag = "local" if self.transport.is_local else hashlib.sha256(self.host.encode()).hexdigest()[:12]
        return cache_dir() / f"kvm-probe-{tag}.json"

    def kvm_probe(self, image: Image, refresh: bool = False) -> dict[str, Any]:
        path = self.probe_cache_path()
        qv = self.qemu_version()
        if path.exists() and not refresh:
            cached = json.loads(path.read_text())
            fresh = time.time() - cached["time"] < PROBE_TTL_S and cached.get("format") == PROBE_FORMAT
            if fresh and cached.get("qemu") == qv:
                return {**cached, "cached": True}
        wd = self.host_path("runtime", "probe", str(os.getpid()))
        kernel, initrd = self.upload_image(image)
        spec = {
            "machine": "q35",
            "accel": "kvm",
            "memory_mib": 128,
            "cpus": 1,
            "kernel": kernel,
            "initrd": initrd,
            "cmdline": "console=ttyS0 quiet panic=-1 tb.pv=v2",
            "qemu": self.qemu_info().get("binary"),
            "action": self.qemu_info().get("action", True),
        }
        try:
            res = self.call(
                "probe_kvm",
                timeout=PROBE_TIMEOUT_S + 30,
                spec=spec,
                workdir=str(wd),
                timeout_s=PROBE_TIMEOUT_S,
            )
        except InfraError as e:
            res = {"ok": False, "reason": str(e)}
        result = {
            "ok": bool(res.get("ok")),
            "reason": res.get("reason", ""),
            "time": time.time(),
            "qemu": qv,
            "kind": res.get("kind"),
            "cpu": res.get("cpu"),  # the model that booted under KVM
            "attempts": res.get("attempts", []),  # each model tried, and why it failed
            "format": PROBE_FORMAT,
        }
        if result["kind"] != "qemu-args":  # a command-line error says nothing about KVM: not cached
            path.write_text(json.dumps(result))
        return result

    # ---- preflight -----------------------------------------------------------
    def preflight(self, cfg: Any = None, *, deep: bool = False) -> HostReport:
        """Controller checks (image build tools, kernel package) plus the host's own
        (QEMU, /dev/kvm, disk, permissions), each failure with its fix. ``deep``
        runs the KVM probe now (it boots a tiny guest)."""
        rep = HostReport(self.host)
        if not isinstance(cfg, QemuVmConfig):
            cfg = None  # a vm_config of another kind says nothing about this host
        for tool, pkg in (("gcc", "gcc libc6-dev"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
            found = shutil.which(tool)
            rep.checks.append(
                Check(f"controller: {tool}", bool(found), found or "not found", f"apt-get install {pkg}")
            )
        libc_a = any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libc.a", "/usr/lib/libc.a"))
        rep.checks.append(
            Check(
                "controller: static libc",
                libc_a,
                "libc.a" if libc_a else "missing",
                "apt-get install libc6-dev",
            )
        )
        cfg = cfg or QemuVmConfig(name="preflight")
        if deep:
            try:
                self.kvm_probe(build_image(cfg), refresh=True)
            except (ImageBuildError, InfraError) as e:
                rep.checks.append(
                    Check("host: kvm probe", False, f"cannot probe KVM: {e}", "see the message")
                )
        try:
            kpkg, kver = resolve_kernel(cfg.kernel.package, cfg.kernel.version)
            rep.checks.append(Check("controller: kernel package", True, f"{kpkg}={kver}"))
        except ImageBuildError as e:
            rep.checks.append(Check("controller: kernel package", False, str(e), "apt-get update"))
        try:
            host = self.call("preflight", timeout=60, qemu=self.qemu_binary)
        except InfraError as e:
            rep.checks.append(
                Check("host agent", False, str(e), "check the host URI, SSH access and python3")
            )
            return rep
        rep.checks += [Check(f"host: {c['name']}", c["ok"], c["detail"], c["fix"]) for c in host["checks"]]
        cached = self.probe_cache_path()
        if cached.exists():
            p = json.loads(cached.read_text())
            verdict = f"usable with -cpu {p.get('cpu') or 'host'}" if p["ok"] else "unusable (TCG fallback)"
            rep.checks.append(Check("host: kvm probe", True, f"{verdict}: {p['reason']}"))
        else:
            rep.checks.append(
                Check("host: kvm probe", True, "not probed yet (--probe runs it; TCG works either way)")
            )
        return rep

    # ---- lifecycle -----------------------------------------------------------
    def provision(self, cfg: QemuVmConfig, strategy: str = "none") -> QemuVm:
        try:
            image = build_image(cfg)
        except ImageBuildError as e:
            raise InfraError(f"image build failed: {e}") from None
        kernel, initrd = self.upload_image(image)
        accel, reason = self.resolve_accel(cfg, image)
        # Owner-tagged: the controller's host name and pid are in every VM name.
        name = f"{cfg.name}-{socket.gethostname()}-{os.getpid()}-{next(_names)}"
        vm = QemuVm(
            name,
            cfg,
            image,
            accel,
            self.qemu_version(),
            strategy,
            self.host_path("runtime", "vms", name),
            kernel,
            initrd,
            self.host,
            qemu_binary=self.qemu_info().get("binary"),
            qemu_action=bool(self.qemu_info().get("action", True)),
        )
        vm.boot["accel_reason"] = reason
        if accel == "kvm" and cfg.accel == "auto":
            vm.cpu_model = self.kvm_probe(image).get("cpu")  # the cached verdict: the model that booted
        return vm

    def start(self, vm: QemuVm, reset: str = "cold") -> dict[str, Any]:
        """Boot the VM to the point where the shutdown IC is offered.

        ``reset="snapshot"`` restores a snapshot taken at READY (made once and
        cached on the host, keyed by everything that shapes it); ``"cold"`` boots.
        """
        incoming = self.ensure_snapshot(vm) if reset == "snapshot" else None
        vm.incoming = incoming
        t = time.monotonic()
        try:
            launched = self.call(
                "launch",
                timeout=SLOT_WAIT_S + 120,  # it may wait for a guest slot held by another run
                name=vm.name,
                workdir=vm.workdir,
                lease_dir=self.host_path("runtime", "leases"),
                spec=vm.spec(incoming),
                owner_pid=os.getpid() if self.transport.is_local else 0,
                max_guests=self.max_guests,
            )
            if launched.get("slot_wait_s", 0) > 1:
                log.warning("%s waited %.1f s for a guest slot on %s (other runs hold them)", vm.name,
                            launched["slot_wait_s"], self.host)  # fmt: skip
            vm.running = True
            ready = self.call(
                "wait_ready",
                timeout=vm.cfg.boot_timeout_s + 30,
                name=vm.name,
                timeout_s=vm.cfg.boot_timeout_s,
                incoming=incoming is not None,
            )
        except InfraError as e:
            self.destroy(vm)
            raise InfraError(f"start of {vm.name} failed: {e}") from None
        ready["wall_s"] = time.monotonic() - t
        ready["slot_wait_s"] = launched.get("slot_wait_s", 0.0)
        ready["reset"] = reset
        return ready

    def snapshot_key(self, vm: QemuVm) -> str:
        blob = json.dumps({**vm.spec(), "image": vm.image.key, "qemu": vm.qemu_version, "strategy": None})
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def ensure_snapshot(self, vm: QemuVm) -> str:
        path = self.host_path("cache", "snapshots", f"{self.snapshot_key(vm)}.mig")
        if self.call("exists", path=path)["exists"]:
            return path
        maker = dataclasses.replace(
            vm, name=vm.name + "-snap", workdir=vm.workdir + "-snap", running=False, boot={}
        )
        try:
            self.start(maker, reset="cold")
            self.call("snapshot", name=maker.name, path=path, timeout=120)
        except InfraError as e:
            raise InfraError(f"snapshot failed: {e}") from None
        finally:
            self.destroy(maker)
        return path

    def uname(self, vm: QemuVm) -> dict[str, Any]:
        return self.call("uname", name=vm.name, timeout_s=10)

    def powerdown(self, vm: QemuVm) -> None:
        self.call("powerdown", name=vm.name)

    def wait_outcome(self, vm: QemuVm, timeout: float) -> dict[str, Any]:
        return self.call("wait_outcome", timeout=timeout + 30, name=vm.name, timeout_s=timeout)

    def race(self, vm: QemuVm, plan: RacePlan, grace_ms: float) -> RaceEvidence:
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
                    "attach_ms": knobs.vtl0_attach_ms,
                    "regression_pct": knobs.regression_pct,
                },
            }
        shutdown = None
        if plan.shutdown:
            shutdown = {
                "id": f"sd{plan.iteration}",
                "reason": "testbed",
                "mode": plan.shutdown_mode,
                "offset_ms": plan.offset_ms if plan.offset_ms is not None else 0.0,
                "phase": plan.phase,
            }
        budget = (knobs.servicing_timeout_ms + grace_ms) / 1000 + 60 + (
            -plan.stream["from_ms"] / 1000 if plan.stream else 0)  # fmt: skip
        res = self.call(
            "race",
            timeout=budget,
            name=vm.name,
            service=service,
            shutdown=shutdown,
            grace_ms=grace_ms,
            servicing_timeout_ms=knobs.servicing_timeout_ms,
            **({"stream": plan.stream} if plan.stream else {}),  # an older agent knows no stream
        )
        res["shutdown_id"] = shutdown["id"] if shutdown else None  # what the verdict looks for
        res["shutdown_plan"] = shutdown
        return evidence.evidence(res)

    def classify(self, ev: RaceEvidence) -> Verdict:
        return evidence.classify(ev)

    def collect(self, vm: QemuVm, dest: Path, *, everything: bool = False) -> list[Path]:
        """Copy the VM's serial log, QEMU stderr and argv from the host (before destroy);
        ``everything`` adds the snapshot it was restored from, so the failed iteration
        can be restored and inspected as it began."""
        dest.mkdir(parents=True, exist_ok=True)
        wanted = [(f"{vm.workdir}/{n}", n) for n in ("serial.log", "qemu.stderr", "qemu.argv.json")]
        if everything and vm.incoming:
            wanted.append((vm.incoming, "snapshot.mig"))
        out = []
        for src, name in wanted:
            try:
                self.transport.get(src, dest / name)
                out.append(dest / name)
            except (OSError, TransportError):
                continue  # never created (QEMU did not start) or the host is gone
        return out

    def destroy(self, vm: QemuVm) -> None:
        """Never leaves a process: the agent escalates quit -> SIGTERM -> SIGKILL
        and removes the work dir. If the agent is gone, its own dead-man switch
        (stdin EOF, PR_SET_PDEATHSIG) has already taken QEMU down; locally the
        lease is reaped here as a last resort."""
        try:
            if vm.running and self.program.running:
                self.call("destroy", name=vm.name, remove_workdir=True, timeout=30)
        except InfraError as e:
            log.warning("destroy of %s through the agent failed (%s)", vm.name, e)
            if self.transport.is_local:
                for path, lease in leases.read_all(runtime_dir() / "leases"):
                    if lease is not None and lease.name == vm.name:
                        leases.kill_group(lease.qemu_pid, lease.qemu_start)
                        path.unlink(missing_ok=True)
                shutil.rmtree(vm.workdir, ignore_errors=True)
        finally:
            vm.running = False

    def gc_host(self) -> list[str]:
        """``testbed gc --host``: reap what dead owners left on the host."""
        res: list[str] = self.call("gc", timeout=120)["actions"]
        return res
