"""The Hyper-V backend: OpenHCL VMs on a Windows host, driven through Testbed.psm1.

One backend, three routes to the host (a PowerShellRunner: WinRM, SSH to
Windows OpenSSH, or a local powershell), plus PowerShell Direct into an L1 VM
for nested Hyper-V. All timing happens on the host in ``Invoke-TestbedRace``;
this class only provisions, calls, and turns the host's answers into evidence.
Every failure of the host or the route becomes ``InfraError``: a broken WinRM
session is never a lost message.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.hyperv import evidence as hv_evidence
from testbed.backends.hyperv import options
from testbed.backends.hyperv.capabilities import CAPABILITIES
from testbed.backends.hyperv.config import HyperVSpec, HyperVVmConfig
from testbed.backends.hyperv.module import CreatedVm, HostModule, Preflight, StartedVm
from testbed.backends.hyperv.phases import anchor_for
from testbed.backends.hyperv.race_evidence import evidence
from testbed.backends.memory import MemoryHold
from testbed.core.config import Artifact
from testbed.core.errors import InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan
from testbed.core.verdicts import Verdict
from testbed.hostprog import leases
from testbed.transport.powershell import PowerShellDirect, PowerShellError, PowerShellRunner, sha256_of

log = logging.getLogger(__name__)

# Build 26100: Windows 11 24H2, which the OpenVMM guide says works for OpenHCL development
# (it recommends 26H1, build 28000+); Server 2025 shares the build but the guide does not
# name it as a development host.
MIN_BUILD = 26100
COM3_MIN_BUILD = 27653  # the additional-COM-ports code path (petri's check; the guide says 26H1, 28000+)
EVENT_SETTLE_MS = 3000  # how long the event log may lag the VM going off
VM_OVERHEAD_MB = 512  # a VM's worker process and VTL2 beside its memory_mb (preflight's own margin)
_vm_numbers = itertools.count(1)


def owner_tag() -> str:
    """Who owns a VM: this controller, pid and process start time (checked by gc)."""
    return f"{socket.gethostname()}:{os.getpid()}:{leases.start_time(os.getpid())}"


@dataclass
class HyperVVm:
    name: str
    cfg: HyperVVmConfig
    strategy: str
    host: str
    igvm_path: str
    vhd_path: str
    vm_dir: str
    com3: bool
    igvm_sha256: str = ""
    vm_id: str | None = None
    running: bool = False
    com1_pipe: str = ""
    com3_pipe: str = ""
    accel: str = "hyperv"
    last: dict[str, Any] = field(default_factory=dict)
    com3_note: str = ""  # why COM3 was not set on the VM, where the host did not offer it
    checkpointed: bool = False  # the VM is kept between iterations and restored to IC OK
    reset_fallback: str = ""  # why the snapshot reset is not used (the host refused a checkpoint)
    firmware_sha256: str = ""  # the build in the VM's firmware file: what the next servicing loads

    @property
    def spec(self) -> HyperVSpec:
        return self.cfg.hyperv

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "vm": self.name,
            "vm_id": self.vm_id,
            "host": self.host,
            "vm_config": self.cfg.name,
            "accel": self.accel,
            "paravisor": os.path.basename(self.igvm_path.replace("\\", "/")),
            "igvm_sha256": self.igvm_sha256,
            "vtl0_image": self.spec.vtl0_image,
            "strategy": self.strategy,
            "nested": self.spec.nested is not None,
            "com3": self.com3,
            "image_hash": self.igvm_sha256,
            "accel_reason": "Hyper-V host",
        }
        if self.com3_note:  # COM3 was asked for and the host's VM did not have it
            rec["com3_note"] = self.com3_note
        return rec


class HyperVBackend:
    kind = "hyperv"
    capabilities = CAPABILITIES

    def __init__(self, ps: PowerShellRunner) -> None:
        self.l0 = HostModule(ps)  # the physical host
        self.module = self.l0  # where the OpenHCL VMs live: L0, or L1 when nested
        self.host = ps.name
        self._l1: tuple[CreatedVm, str] | None = None  # the L1 VM and its folder on L0
        self._kept: dict[str, HyperVVm] = {}  # checkpointed VMs, removed by close
        self.host_info: Preflight | None = None
        self.memory = MemoryHold(self.host)  # its VM's share of the host's free memory, against other lanes
        self._builds: dict[str, tuple[str, str]] = {}  # build name -> (path in the host's cache, sha256)

    def close(self) -> None:
        for kept in list(self._kept.values()):
            self._remove(kept)
        self.memory.release()
        if self._l1 is not None:
            l1, vm_dir = self._l1
            try:
                self.l0.remove_vm(l1.vm_id, vm_dir)
            except InfraError as e:
                log.warning("could not remove the L1 VM %s: %s", l1.name, e)
            self._l1 = None
            self.module = self.l0
        self.l0.runner.close()

    def __enter__(self) -> HyperVBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- preflight ---------------------------------------------------------------------
    def preflight(self, cfg: Any = None, *, deep: bool = False) -> HostReport:
        rep = HostReport(self.host)
        try:
            p = self.module.preflight()
        except InfraError as e:
            rep.checks.append(Check("reach the host", False, str(e), _reach_fix(str(e))))
            return rep
        self.host_info = p
        if p.com3_supported:
            com3 = "available (build and EnableAdditionalComPorts = 1)"
        elif p.com3_build:
            com3 = (r"this build has COM3, but EnableAdditionalComPorts is not 1 under HKLM:\SOFTWARE\Microsoft"
                    r"\Windows NT\CurrentVersion\Virtualization (set it, restart vmms): the guest-side servicing "
                    "anchor is unavailable")  # fmt: skip
        else:
            com3 = (f"not on this build (needs {COM3_MIN_BUILD}+, e.g. Windows 11 26H1; not 24H2, 25H2 or Server "
                    "2025): the guest-side servicing anchor is unavailable")  # fmt: skip
        need = (cfg.hyperv.memory_mb + VM_OVERHEAD_MB) if isinstance(cfg, HyperVVmConfig) else 1024
        rep.checks += [
            Check("Hyper-V", p.hyper_v, f"{p.edition} edition, build {p.build}", p.hyper_v_fix),
            Check(
                "AllowFirmwareLoadFromFile",
                p.allow_firmware_load_from_file,
                "lets a VM load its IGVM firmware from a file",
                r"Set-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization'"
                " -Name AllowFirmwareLoadFromFile -Value 1 -Type DWord (or playbooks/hosts/hyperv-host.yml)",
            ),
            Check(
                "OS build",
                p.build >= MIN_BUILD,
                f"build {p.build} (OpenHCL needs {MIN_BUILD}+)",
                "update the host to Windows 11 24H2 (build 26100) or newer; the OpenVMM guide recommends 26H1 "
                "(build 28000+)",
            ),  # fmt: skip
            Check("COM3 (OpenHCL log)", True, com3),
            Check(
                "free memory",
                p.free_memory_mb >= need,
                f"{p.free_memory_mb} MB free, need {need}",
                "stop other VMs or lower hyperv.memory_mb",
            ),  # fmt: skip
        ]
        return rep

    # ---- artifacts -----------------------------------------------------------------------
    def artifact(self, a: Artifact, base: Path, where: HostModule | None = None) -> tuple[str, str]:
        """(path on the host, sha256): the host's cache is keyed by the hash (uploaded or pulled)."""
        host = where or self.module
        if a.path:
            local = (base / a.path) if not os.path.isabs(a.path) else Path(a.path)
            try:
                digest = sha256_of(local)  # read in chunks: a multi-GB VHDX is never held whole
            except OSError as e:
                raise InfraError(f"artifact {a.path}: {e}") from None
            if a.sha256 and a.sha256.lower() != digest:
                raise InfraError(f"artifact {local} has sha256 {digest}, the vm_config says {a.sha256}")
            remote = rf"{host.host_dir}\cache\{digest}\{a.file_name}"
            host.upload(local, remote, digest)
            return remote, digest
        assert a.sha256 is not None
        sha = a.sha256.lower()
        if isinstance(host.runner, PowerShellDirect):
            # L1 has no network adapter on a switch, and a share opened inside a WinRM
            # session is a second hop (denied without CredSSP): L0 pulls it into its own
            # cache, and it is copied in over PowerShell Direct as uploads are.
            staged = self.l0.pull_artifact(sha, a.file_name, url=a.url or "", share=a.share or "")
            remote = rf"{host.host_dir}\cache\{sha}\{a.file_name}"
            host.copy_in(staged.path, remote, sha)
            return remote, sha
        pulled = host.pull_artifact(sha, a.file_name, url=a.url or "", share=a.share or "")
        return pulled.path, sha

    # ---- VM lifecycle --------------------------------------------------------------------
    def provision(self, cfg: HyperVVmConfig, strategy: str = "none") -> HyperVVm:
        """Check the host, bring the artifacts into its cache and, for nested Hyper-V, the
        L1 VM up; each iteration's VM is created fresh by ``start``."""
        if not isinstance(cfg, HyperVVmConfig):
            raise InfraError(f"vm_config {cfg.name} is for backend {cfg.backend}, not hyperv")
        spec = cfg.hyperv
        base = Path.cwd()  # artifact paths were anchored at the vm_config's folder when loaded
        if spec.nested is None:
            self.l0.host_dir = spec.host_dir
        elif self._l1 is None:
            self.l0.host_dir = spec.nested.host_dir
            self._nested_up(cfg, base)
        rep = self.preflight(cfg)
        bad = [c for c in rep.checks if not c.ok]
        if bad:
            raise InfraError(
                "host not ready: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad)
            )
        assert self.host_info is not None
        self.memory.take(self.host_info.free_memory_mb, spec.memory_mb + VM_OVERHEAD_MB)
        if strategy != "none":
            log.info(
                "strategy %r does not apply on Hyper-V: the host's own preservation is what is tested",
                strategy,
            )
        igvm, igvm_sha256 = self.artifact(spec.igvm, base)
        vhd, _ = self.artifact(spec.vtl0_vhd, base)
        com3 = spec.com3 == "auto" and self.host_info is not None and self.host_info.com3_supported
        # Unique per VM of this process (lanes provision at the same millisecond): the pipes,
        # the folder and the owner tag follow the name.
        name = f"{cfg.name}-{socket.gethostname()}-{os.getpid()}-{next(_vm_numbers)}"
        vm_dir = rf"{self.module.host_dir}\vms\{name}"
        return HyperVVm(name, cfg, "hyperv-host", self.host, igvm, vhd, vm_dir, com3, igvm_sha256)

    def _nested_up(self, cfg: HyperVVmConfig, base: Path) -> None:
        assert cfg.hyperv.nested is not None
        n = cfg.hyperv.nested
        password = os.environ.get(n.password_env)
        if password is None:
            raise InfraError(f"nested Hyper-V: the L1 password variable {n.password_env} is not set")
        vhd, _ = self.artifact(n.l1_vhd, base, self.l0)
        name = f"testbed-l1-{socket.gethostname()}-{os.getpid()}"
        vm_dir = rf"{self.l0.host_dir}\vms\{name}"
        l1 = self.l0.new_l1_vm(name, vhd, vm_dir, owner_tag(), memory_mb=n.memory_mb, processors=n.processors,
                               heartbeat_timeout_s=n.heartbeat_timeout_s)  # fmt: skip
        self._l1 = (l1, vm_dir)
        direct = PowerShellDirect(self.l0.runner, name, n.user, password, rf"{self.l0.host_dir}\staging")
        try:
            direct.wait_ready(n.ps_direct_timeout_s)
        except PowerShellError as e:
            raise InfraError(str(e)) from None
        self.module = HostModule(direct, cfg.hyperv.host_dir)
        log.info("nested Hyper-V: L1 VM %s is up; the module now runs inside it", name)

    def start(self, vm: HyperVVm, reset: str = "cold") -> dict[str, Any]:
        """Bring the VM to shutdown-IC OK for one iteration.

        ``cold``: a new VM from the cached artifacts, booted (tens of seconds on a real
        host). ``snapshot``: the first iteration creates and boots the VM and takes a
        checkpoint at IC OK; every iteration, the first included, then runs from a
        restore of it, so one statistic never mixes the two. A host that refuses the
        checkpoint falls back to ``cold``, and every record says why."""
        t = time.monotonic()
        s = vm.spec
        if reset == "snapshot" and vm.checkpointed and vm.vm_id is not None:
            started = self._restore(vm)
        else:
            started = self._create_and_boot(vm)
            if reset == "snapshot" and not vm.reset_fallback:
                assert vm.vm_id is not None
                try:
                    self.module.save_checkpoint(vm.vm_id)
                except InfraError as e:
                    vm.reset_fallback = f"the host refused a checkpoint of {vm.name}: {e}"
                    log.warning(
                        "snapshot reset unavailable, every iteration boots a new VM: %s", vm.reset_fallback
                    )
                else:
                    vm.checkpointed = True
                    started = self._restore(vm)
        used = "snapshot" if vm.checkpointed else "cold"
        boot = {"wall_s": time.monotonic() - t, "reset": used, "requested_reset": reset,
                "ic_ready_ms": started.ready_ms}  # fmt: skip
        if vm.reset_fallback and reset == "snapshot":
            boot["reset_fallback"] = vm.reset_fallback
        if started.ic != "OK":
            raise InfraError(
                f"the shutdown IC of {vm.name} reported {started.ic!r}, not OK, {s.ic_ready_timeout_s} s after "
                f"start: is the VTL0 image ({s.vtl0_image}) running its integration services (hv_utils)?"
            )
        return boot

    def _create_and_boot(self, vm: HyperVVm) -> StartedVm:
        s = vm.spec
        vm.com1_pipe = f"{vm.name}-com1" if s.com1 else ""
        vm.com3_pipe = f"{vm.name}-com3" if vm.com3 else ""
        created = self.module.new_vm(vm.name, vm.igvm_path, vm.vhd_path, vm.vm_dir, owner_tag(),
                                     memory_mb=s.memory_mb, processors=s.processors,
                                     firmware_cmdline=s.firmware_cmdline, com1_pipe=vm.com1_pipe,
                                     com3_pipe=vm.com3_pipe, increase_vtl2_memory=s.increase_vtl2_memory)  # fmt: skip
        vm.vm_id = created.vm_id
        vm.firmware_sha256 = vm.igvm_sha256  # New-TestbedVm copied the boot build into its folder
        vm.running = True
        if (
            vm.com3_pipe and created.com3 is False
        ):  # probed on the VM: the anchor is unavailable, never guessed
            log.warning("%s: %s; the guest-side servicing anchor is unavailable", vm.name, created.com3_note)
            vm.com3, vm.com3_pipe, vm.com3_note = False, "", created.com3_note
        return self.module.start_vm(vm.vm_id, s.ic_ready_timeout_s)

    def _restore(self, vm: HyperVVm) -> StartedVm:
        """Restore the checkpoint; a VM that cannot be restored is removed (the next
        iteration starts over with a new one) and this iteration is an infra-error."""
        assert vm.vm_id is not None
        try:
            started = self.module.restore_vm(vm.vm_id, vm.spec.ic_ready_timeout_s)
        except InfraError:
            self._remove(vm)
            raise
        vm.running = True
        return started

    def race(self, vm: HyperVVm, plan: RacePlan, grace_ms: float) -> RaceEvidence:
        """One iteration, timed on the host; returns the evidence ``classify`` reads."""
        assert vm.vm_id is not None
        self._servicing_build(vm, plan.image)
        s = vm.spec
        grace = max(grace_ms, s.shutdown_grace_ms)
        anchor = anchor_for(plan, s.com3_phase_patterns, vm.com3_pipe, vm.com3_note, vm.name)
        race = self.module.race(
            vm.vm_id,
            offset_ms=float(plan.offset_ms or 0.0),
            options=options(
                override_version_checks=s.override_version_checks,
                disable_nvme_keepalive=s.disable_nvme_keepalive,
            ),  # fmt: skip
            timeout_hint_secs=s.timeout_hint_secs,
            service=plan.service,
            shutdown=plan.shutdown,
            after_ready=plan.shutdown_mode == "after-ready",
            grace_ms=grace,
            ic_ready_timeout_s=s.ic_ready_timeout_s,
            com1_pipe=vm.com1_pipe,
            com3_pipe=vm.com3_pipe,
            anchor=anchor,
        )
        # A VM that went off has an event saying how; give the log a moment to have it.
        events = self.module.events(
            vm.vm_id, race.started_utc, settle_ms=0 if race.running else EVENT_SETTLE_MS
        )
        followed = plan.phase if plan.shutdown_mode == "phase" else None
        ev = evidence(race, events, s, grace, plan.shutdown, phase=followed)
        vm.last = ev.raw
        return ev

    def _servicing_build(self, vm: HyperVVm, image: str | None) -> None:
        """Put the build this servicing loads into the VM's firmware file, when it is not
        there already: ``image`` (a name of hyperv.images), else the build the VM booted.
        A checkpoint restore does not touch the file, so what is in it is tracked."""
        if image is None:
            path, sha = vm.igvm_path, vm.igvm_sha256
        else:
            build = vm.spec.images.get(image)
            if build is None:
                raise InfraError(
                    f"no build {image!r} in hyperv.images (it has: {', '.join(vm.spec.images) or 'none'})"
                )
            if image not in self._builds:  # brought into the host's cache once (hash-checked)
                self._builds[image] = self.artifact(build, Path.cwd())
            path, sha = self._builds[image]
        if sha == vm.firmware_sha256:
            return
        assert vm.vm_id is not None
        put = self.module.set_servicing_igvm(vm.vm_id, vm.vm_dir, path)
        if put.sha256 != sha:
            raise InfraError(
                f"the firmware file of {vm.name} has sha256 {put.sha256} after copying {path}, not {sha}"
            )
        vm.firmware_sha256 = sha

    def classify(self, ev: RaceEvidence) -> Verdict:
        return hv_evidence.classify(ev)

    def collect(self, vm: HyperVVm, dest: Path, *, everything: bool = False) -> list[Path]:
        """The race's own evidence: the serial lines, the events, the host's timings."""
        dest.mkdir(parents=True, exist_ok=True)
        if not vm.last:
            return []
        race = vm.last["race"]
        files = {
            "com1.log": "".join(f"{e['Ms']:10.1f} {e['Line']}\n" for e in race["Com1"]),
            "com3.log": (f"# {vm.com3_note}\n" if vm.com3_note else "")
            + "".join(f"{e['Ms']:10.1f} {e['Line']}\n" for e in race["Com3"]),
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
        """End of an iteration. A checkpointed VM is kept for the next restore (which
        turns it off first) and removed by ``close``; any other VM is removed now."""
        if vm.vm_id is None:
            return
        if vm.checkpointed:
            self._kept[vm.vm_id] = vm
            return
        self._remove(vm)

    def _remove(self, vm: HyperVVm) -> None:
        if vm.vm_id is None:
            return
        self._kept.pop(vm.vm_id, None)
        try:
            self.module.remove_vm(vm.vm_id, vm.vm_dir)
        except InfraError as e:
            log.warning("could not remove %s (%s): `testbed gc --host` will reap it", vm.name, e)
        finally:
            vm.vm_id = None
            vm.running = False
            vm.checkpointed = False

    def gc_host(self) -> list[str]:
        """Remove VMs tagged by a testbed process of this controller that is gone."""
        me = socket.gethostname()
        actions = []
        for v in self.l0.owned_vms():
            host, _, rest = v.owner.partition(":")
            pid_s, _, start_s = rest.partition(":")
            if host != me or not pid_s.isdigit():
                actions.append(f"kept {v.name}: owned by {v.owner} (another controller)")
                continue
            if leases.alive(int(pid_s), int(start_s) if start_s.isdigit() else None):
                continue
            self.l0.remove_vm(v.vm_id, v.path)
            actions.append(f"removed Hyper-V VM {v.name} (owner pid {pid_s} is gone)")
        return actions


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
