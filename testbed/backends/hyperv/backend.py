"""The Hyper-V backend: OpenHCL VMs on a Windows host, driven through Testbed.psm1.

One backend, three routes to the host (a PowerShellRunner: WinRM, SSH to
Windows OpenSSH, or a local powershell), plus PowerShell Direct into an L1 VM
for nested Hyper-V. All timing happens on the host in ``Invoke-TestbedRace``;
this class only provisions, calls, and turns the host's answers into evidence.
Every failure of the host or the route becomes ``InfraError``: a broken WinRM
session is never a lost message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from testbed import leases
from testbed.backends.base import Check, HostReport, InfraError, RacePlan
from testbed.backends.hyperv import options
from testbed.backends.hyperv.evidence import EV_SHUTDOWN_IC
from testbed.config import Artifact, HyperVSpec, VmConfig
from testbed.transport.base import TransportError
from testbed.transport.powershell import PowerShellDirect, PowerShellError, PowerShellRunner

log = logging.getLogger(__name__)

MIN_GRACE_MS = 3000.0  # a real VTL0 needs a moment to log the request on COM1
MIN_BUILD = 26100  # Windows 11 24H2 / Server 2025: OpenHCL development support


def module_source() -> bytes:
    return (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_bytes()


def owner_tag() -> str:
    """Who owns a VM: this controller, pid and process start time (checked by gc)."""
    return f"{socket.gethostname()}:{os.getpid()}:{leases.start_time(os.getpid())}"


@dataclass
class HyperVVm:
    name: str
    cfg: VmConfig
    strategy: str
    host: str
    igvm_path: str
    vhd_path: str
    vm_dir: str
    com3: bool
    vm_id: str | None = None
    running: bool = False
    accel: str = "hyperv"
    boot: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> HyperVSpec:
        assert self.cfg.hyperv is not None
        return self.cfg.hyperv

    def record(self) -> dict[str, Any]:
        return {
            "vm": self.name,
            "vm_id": self.vm_id,
            "host": self.host,
            "vm_config": self.cfg.name,
            "accel": self.accel,
            "paravisor": os.path.basename(self.igvm_path.replace("\\", "/")),
            "igvm_sha256": self.spec.igvm.sha256,
            "vtl0_image": self.spec.vtl0_image,
            "strategy": self.strategy,
            "nested": self.spec.nested is not None,
            "com3": self.com3,
            "image_hash": self.spec.igvm.sha256,
            "accel_reason": "Hyper-V host",
        }


class HyperVBackend:
    kind = "hyperv"

    def __init__(self, ps: PowerShellRunner) -> None:
        self.ps = ps
        self.l0 = ps  # the physical host, even when self.ps is PowerShell Direct into L1
        self.host = ps.name
        self.host_dirs: dict[int, str] = {id(ps): r"C:\testbed"}  # per runner: L0, and L1 when nested
        self._modules: set[tuple[int, str]] = set()  # (runner, path) where the module is uploaded
        self._l1: dict[str, Any] | None = None
        self.preflight_data: dict[str, Any] = {}

    # ---- calling the module ------------------------------------------------------------
    def host_dir(self, runner: PowerShellRunner | None = None) -> str:
        """testbed's folder on the host the runner reaches (vm_config ``host_dir``)."""
        return self.host_dirs[id(runner or self.ps)]

    def module_path(self, runner: PowerShellRunner | None = None) -> str:
        digest = hashlib.sha256(module_source()).hexdigest()[:12]
        return rf"{self.host_dir(runner)}\modules\Testbed-{digest}.psm1"

    def call(self, function: str, runner: PowerShellRunner | None = None, **params: Any) -> Any:
        """One Testbed.psm1 function on the host; failures become InfraError with the host's words."""
        ps = runner or self.ps
        try:
            path = self.module_path(ps)
            if (id(ps), path) not in self._modules:
                ps.upload(module_source(), path)
                self._modules.add((id(ps), path))
            return ps.invoke(path, function, params)
        except PowerShellError as e:
            raise InfraError(f"{function} failed on {ps.name}: {e}") from None
        except TransportError as e:
            raise InfraError(f"{ps.name}: {e}") from None

    def close(self) -> None:
        if self._l1 is not None:
            try:
                self.call("Remove-TestbedVm", self.l0, VmId=self._l1["VmId"], VmDir=self._l1["VmDir"])
            except InfraError as e:
                log.warning("could not remove the L1 VM %s: %s", self._l1["Name"], e)
            self._l1 = None
            self.ps = self.l0
        self.l0.close()

    def __enter__(self) -> HyperVBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- preflight ---------------------------------------------------------------------
    def preflight(self, cfg: VmConfig | None = None) -> HostReport:
        rep = HostReport(self.host)
        try:
            p = self.call("Get-TestbedPreflight")
        except InfraError as e:
            rep.checks.append(Check("reach the host", False, str(e), _reach_fix(str(e))))
            return rep
        self.preflight_data = p
        rep.checks += [
            Check(
                "Hyper-V", bool(p["HyperV"]), f"{p['Edition']} edition, build {p['Build']}", p["HyperVFix"]
            ),
            Check(
                "AllowFirmwareLoadFromFile",
                bool(p["AllowFirmwareLoadFromFile"]),
                "lets a VM load its IGVM firmware from a file",
                r"Set-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization'"
                " -Name AllowFirmwareLoadFromFile -Value 1 -Type DWord (or playbooks/hosts/hyperv-host.yml)",
            ),
            Check(
                "OS build",
                int(p["Build"]) >= MIN_BUILD,
                f"build {p['Build']} (OpenHCL needs {MIN_BUILD}+)",
                "update the host to Windows 11 24H2 / Server 2025 or newer",
            ),
            Check(
                "COM3 (OpenHCL log)",
                True,
                "available"
                if p["Com3Supported"]
                else "not on this build (needs newer than 24H2): the guest-side servicing anchor is unavailable",
            ),  # fmt: skip
        ]
        need = (cfg.hyperv.memory_mb + 512) if cfg is not None and cfg.hyperv is not None else 1024
        rep.checks.append(
            Check(
                "free memory",
                int(p["FreeMemoryMB"]) >= need,
                f"{p['FreeMemoryMB']} MB free, need {need}",
                "stop other VMs or lower hyperv.memory_mb",
            )  # fmt: skip
        )
        return rep

    # ---- artifacts -----------------------------------------------------------------------
    def artifact(self, a: Artifact, base: Path, runner: PowerShellRunner | None = None) -> str:
        """The artifact's path on the host, in a cache keyed by sha256 (uploaded or pulled)."""
        cache = rf"{self.host_dir(runner)}\cache"
        if a.path:
            local = (base / a.path) if not os.path.isabs(a.path) else Path(a.path)
            try:
                data = local.read_bytes()
            except OSError as e:
                raise InfraError(f"artifact {a.path}: {e}") from None
            digest = hashlib.sha256(data).hexdigest()
            if a.sha256 and a.sha256.lower() != digest:
                raise InfraError(f"artifact {local} has sha256 {digest}, the vm_config says {a.sha256}")
            remote = rf"{cache}\{digest}\{a.file_name}"
            try:
                (runner or self.ps).upload(data, remote)
            except (PowerShellError, TransportError) as e:
                raise InfraError(f"upload of {local} failed: {e}") from None
            return remote
        assert a.sha256 is not None
        got = self.call("Get-TestbedArtifact", runner, Sha256=a.sha256, FileName=a.file_name, CacheDir=cache,
                        Url=a.url or "", SharePath=a.share or "")  # fmt: skip
        return str(got["Path"])

    # ---- VM lifecycle --------------------------------------------------------------------
    def provision(self, cfg: VmConfig, strategy: str = "none", base: Path | None = None) -> HyperVVm:
        """Check the host, bring the artifacts into its cache and, for nested Hyper-V, the
        L1 VM up; each iteration's VM is created fresh by ``start``."""
        if cfg.hyperv is None:
            raise InfraError(f"vm_config {cfg.name} has no hyperv section (backend: {cfg.backend})")
        spec = cfg.hyperv
        base = base or Path.cwd()
        if spec.nested is None:
            self.host_dirs[id(self.ps)] = spec.host_dir
        elif self._l1 is None:
            self.host_dirs[id(self.l0)] = spec.nested.host_dir
            self._nested_up(cfg, base)
        rep = self.preflight(cfg)
        bad = [c for c in rep.checks if not c.ok]
        if bad:
            raise InfraError(
                "host not ready: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad)
            )
        if strategy != "none":
            log.info(
                "strategy %r does not apply on Hyper-V: the host's own preservation is what is tested",
                strategy,
            )
        igvm = self.artifact(spec.igvm, base)
        vhd = self.artifact(spec.vtl0_vhd, base)
        com3 = spec.com3 == "auto" and bool(self.preflight_data.get("Com3Supported"))
        name = f"{cfg.name}-{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        return HyperVVm(
            name, cfg, "hyperv-host", self.host, igvm, vhd, rf"{self.host_dir()}\vms\{name}", com3
        )

    def _nested_up(self, cfg: VmConfig, base: Path) -> None:
        assert cfg.hyperv is not None and cfg.hyperv.nested is not None
        n = cfg.hyperv.nested
        password = os.environ.get(n.password_env)
        if password is None:
            raise InfraError(f"nested Hyper-V: the L1 password variable {n.password_env} is not set")
        vhd = self.artifact(n.l1_vhd, base, self.l0)
        name = f"testbed-l1-{socket.gethostname()}-{os.getpid()}"
        vm_dir = rf"{self.host_dir(self.l0)}\vms\{name}"
        l1 = self.call("New-TestbedL1Vm", self.l0, Name=name, VhdPath=vhd, VmDir=vm_dir, Owner=owner_tag(),
                       MemoryMB=n.memory_mb, ProcessorCount=n.processors,
                       HeartbeatTimeoutSecs=n.heartbeat_timeout_s)  # fmt: skip
        self._l1 = {**l1, "VmDir": vm_dir}
        self.ps = PowerShellDirect(self.l0, name, n.user, password)
        self.host_dirs[id(self.ps)] = cfg.hyperv.host_dir  # inside L1
        log.info("nested Hyper-V: L1 VM %s is up; the module now runs inside it", name)

    def start(self, vm: HyperVVm, reset: str = "cold") -> dict[str, Any]:
        """Create the VM from the cached artifacts, start it, wait for the shutdown IC.

        Every iteration gets a new VM (Hyper-V has no snapshot fast reset here), so
        ``reset`` is always cold; the record says so."""
        s = vm.spec
        t = time.monotonic()
        pipes: dict[str, Any] = {
            "Com1Pipe": f"{vm.name}-com1" if s.com1 else "",
            "Com3Pipe": f"{vm.name}-com3" if vm.com3 else "",
        }
        created = self.call("New-TestbedVm", Name=vm.name, IgvmPath=vm.igvm_path, VhdPath=vm.vhd_path,
                            VmDir=vm.vm_dir, Owner=owner_tag(), MemoryMB=s.memory_mb, ProcessorCount=s.processors,
                            FirmwareCommandLine=s.firmware_cmdline, **pipes)  # fmt: skip
        vm.vm_id = str(created["VmId"])
        vm.running = True
        vm.boot.update(pipes)
        started = self.call("Start-TestbedVm", VmId=vm.vm_id, IcReadyTimeoutSecs=s.ic_ready_timeout_s)
        if started["Ic"] != "OK":
            raise InfraError(
                f"the shutdown IC of {vm.name} reported {started['Ic']!r}, not OK, {s.ic_ready_timeout_s} s after "
                f"start: is the VTL0 image ({s.vtl0_image}) running its integration services (hv_utils)?"
            )
        return {"wall_s": time.monotonic() - t, "reset": "cold", "requested_reset": reset,
                "ic_ready_ms": started["ReadyMs"]}  # fmt: skip

    def race(self, vm: HyperVVm, plan: RacePlan, grace_ms: float) -> dict[str, Any]:
        """One iteration, timed on the host; returns the evidence ``classify`` reads."""
        if plan.image is not None:
            raise InfraError("servicing into another IGVM image is not supported by the Hyper-V backend yet")
        assert vm.vm_id is not None
        s = vm.spec
        grace = max(grace_ms, MIN_GRACE_MS)
        opts = options(override_version_checks=s.override_version_checks,
                       disable_nvme_keepalive=s.disable_nvme_keepalive)  # fmt: skip
        race = self.call(
            "Invoke-TestbedRace",
            VmId=vm.vm_id,
            OffsetMs=float(plan.offset_ms or 0.0),
            Options=opts,
            TimeoutHintSecs=s.timeout_hint_secs,
            Service=plan.service,
            Shutdown=plan.shutdown,
            AfterReady=plan.shutdown_mode == "after-ready",
            GraceMs=grace,
            IcReadyTimeoutSecs=s.ic_ready_timeout_s,
            Com1Pipe=vm.boot.get("Com1Pipe", ""),
            Com3Pipe=vm.boot.get("Com3Pipe", ""),
        )
        events = self.call("Get-TestbedEvents", VmId=vm.vm_id, SinceUtc=race["StartedUtc"]) or []
        events = events if isinstance(events, list) else [events]  # 5.1 unwraps one-element arrays
        race["Com1"] = _as_list(race.get("Com1"))
        race["Com3"] = _as_list(race.get("Com3"))
        ev = evidence(race, events, s, grace, plan.shutdown)
        vm.last = ev
        return ev

    def collect(self, vm: HyperVVm, dest: Path) -> list[Path]:
        """The race's own evidence: the serial lines, the events, the host's timings."""
        dest.mkdir(parents=True, exist_ok=True)
        if not vm.last:
            return []
        race = vm.last["race"]
        files = {
            "com1.log": "".join(f"{e['Ms']:10.1f} {e['Line']}\n" for e in race["Com1"]),
            "com3.log": "".join(f"{e['Ms']:10.1f} {e['Line']}\n" for e in race["Com3"]),
            "events.json": json.dumps(vm.last["events"], indent=2),
            "race.json": json.dumps(race, indent=2),
        }
        out = []
        for name, text in files.items():
            (dest / name).write_text(text)
            out.append(dest / name)
        vm.last = {}
        return out

    def destroy(self, vm: HyperVVm) -> None:
        if vm.vm_id is None:
            return
        try:
            self.call("Remove-TestbedVm", VmId=vm.vm_id, VmDir=vm.vm_dir)
        except InfraError as e:
            log.warning("could not remove %s (%s): `testbed gc --host` will reap it", vm.name, e)
        finally:
            vm.vm_id = None
            vm.running = False

    def gc_host(self) -> list[str]:
        """Remove VMs tagged by a testbed process of this controller that is gone."""
        me = socket.gethostname()
        actions = []
        owned = self.call("Get-TestbedOwnedVm") or []
        for v in owned if isinstance(owned, list) else [owned]:
            host, _, rest = str(v["Owner"]).partition(":")
            pid_s, _, start_s = rest.partition(":")
            if host != me or not pid_s.isdigit():
                actions.append(f"kept {v['Name']}: owned by {v['Owner']} (another controller)")
                continue
            start = int(start_s) if start_s.isdigit() else None
            if leases.alive(int(pid_s), start):
                continue
            self.call("Remove-TestbedVm", VmId=v["VmId"], VmDir=str(v.get("Path") or ""))
            actions.append(f"removed Hyper-V VM {v['Name']} (owner pid {pid_s} is gone)")
        return actions


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def _reach_fix(msg: str) -> str:
    if "401" in msg:
        return "check the user and the password variable; for a local account over NTLM use .\\user"
    if "Connection refused" in msg or "Max retries" in msg or "timed out" in msg:
        return "enable WinRM on the host: winrm quickconfig -transport:https (or playbooks/hosts/hyperv-host.yml)"
    if "CERTIFICATE_VERIFY_FAILED" in msg:
        return (
            "give the CA of the host's WinRM certificate as ca_bundle in the inventory (or verify_tls: false)"
        )
    return "see the message above"


def evidence(
    race: dict[str, Any], events: list[dict[str, Any]], spec: HyperVSpec, grace_ms: float, fired: bool
) -> dict[str, Any]:
    """The race in the engine's terms: t0 = the servicing request, all on the host's clock."""
    import re

    ms = 1e6
    svc_ms = race.get("ServiceMs")
    anchor = None
    if spec.com3_servicing_start_pattern and race["Com3"]:
        pat = re.compile(spec.com3_servicing_start_pattern)
        anchor = next((e["Ms"] for e in race["Com3"] if pat.search(e["Line"])), None)
    svc: dict[str, Any] = {}
    if svc_ms is not None:
        svc["request_ns"] = svc_ms * ms
        if race.get("ServiceDoneMs") is not None:
            svc["done_ns"] = race["ServiceDoneMs"] * ms
        if anchor is not None:
            svc["start_ns"] = anchor * ms
    zero = svc_ms if svc_ms is not None else race.get("StartMs", 0.0)
    timeline = [(e["Ms"] - zero, f"COM1 {e['Line']}") for e in race["Com1"]]
    timeline += [(e["Ms"] - zero, f"COM3 {e['Line']}") for e in race["Com3"]]
    for key, label in (("ServiceMs", "host ReloadManagementVtl"), ("FireMs", "host InitiateShutdown"),
                       ("ServiceDoneMs", "host servicing job done"), ("OffMs", "host VM off")):  # fmt: skip
        if race.get(key) is not None:
            timeline.append((race[key] - zero, label))
    return {
        "backend": "hyperv",
        "race": race,
        "events": events,
        "vtl0_pattern": spec.vtl0_shutdown_pattern,
        "grace_ms": grace_ms,
        "t0_ns": svc_ms * ms if svc_ms is not None else None,
        "fire_ns": race["FireMs"] * ms if race.get("FireMs") is not None else None,
        "svc": svc,
        "guest_anchor_ms": anchor,
        "guest_anchor": "COM3" if anchor is not None else "unavailable",
        "shutdown_id": "shutdown-ic" if fired else None,
        "ic_at_fire": race.get("IcAtFire"),
        "ended": not race.get("Running", True),
        "shutdown_event": any(int(e["Id"]) == EV_SHUTDOWN_IC for e in events),
        "timeline": sorted(timeline),
    }
