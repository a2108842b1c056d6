"""An emulated Hyper-V host for the tests: Testbed.psm1's functions, answered by VMs of
the reference lab (real QEMU guests, serviced and shut down through the lab).

Hyper-V's view is derived from the lab's evidence the way a real host would
show it: ReloadManagementVtl returns 4096 and a job whose state follows the
paravisor's servicing report; InitiateShutdown returns 0 while the IC is OK and
32775 (invalid state) otherwise; the VM's end becomes event 18504 (shut down
through the IC) or 18590 (guest crash); the guest's VTL0 lines are COM1 and the
paravisor's lines COM3, all on one millisecond clock of the race. Faults are
injected on demand. This file is test support, not product code.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from testbed.backends.qemu.backend import QemuBackend, QemuVm
from testbed.backends.qemu.evidence import guest_time_us
from testbed.core.config import VmConfig
from testbed.core.evidence import RacePlan

SERVICE_MS = 5.0  # where the emulated race's Stopwatch is when servicing is requested
INVALID_STATE = 32775
WORKER_LOG = "Microsoft-Windows-Hyper-V-Worker-Admin"
COM3_MIN_BUILD = 27653  # the additional-COM-ports code path (petri's check)


@dataclass(frozen=True)
class HostProfile:
    """What differs between the Windows hosts testbed meets, for the rules the emulated
    host enforces (execution policy, COM3)."""

    name: str
    build: int
    edition: str  # client | server
    execution_policy: str  # the machine default: Restricted on client SKUs
    additional_com_ports: bool = False  # EnableAdditionalComPorts = 1 (where the build has it)


PROFILES = {
    p.name: p
    for p in (
        HostProfile("win11-24h2", 26100, "client", "Restricted"),
        HostProfile("win11-25h2", 26200, "client", "Restricted"),
        HostProfile("server-2025", 26100, "server", "RemoteSigned"),
        HostProfile("win11-26h1", 28000, "client", "Restricted", additional_com_ports=True),
    )
}


@dataclass
class HvFaults:
    ic_status: str | None = None  # what the shutdown IC reports at start (e.g. "No Contact")
    ic_at_race: str | None = None  # what it reports when the race samples it ("Degraded")
    reload_return: int | None = None  # ReloadManagementVtl's return value (e.g. 32773)
    job_never_finishes: bool = False
    job_error: int | None = None  # the servicing job fails with this ErrorCode
    shutdown_job_fails: bool = False  # InitiateShutdown returns 4096, then its job fails (0x80004005)
    worker_terminated: bool = False  # the VM's worker process dies: 14070, in the VMMS log
    com1_unreadable: bool = False  # the COM1 pipe never accepts the reader
    checkpoint_refused: bool = False  # Checkpoint-VM fails (a host or VM type without checkpoints)


@dataclass
class HvVm:
    vm_id: str
    name: str
    owner: str
    path: str
    lab: QemuVm
    com1_pipe: str
    com3_pipe: str
    state: str = "Off"
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: bool = False


class EmulatedHyperV:
    def __init__(self, lab_cfg: VmConfig, strategy: str = "none", *, profile: HostProfile = PROFILES["server-2025"],
                 files: dict[str, bytes] | None = None, network: bool = True) -> None:  # fmt: skip
        self.lab_cfg = lab_cfg
        # False for a nested L1 VM: its adapter is on no switch, and a share opened in a
        # remote session there is a second hop (no credentials to pass on).
        self.network = network
        self.strategy = strategy
        self.profile = profile
        self.build = profile.build
        self.allow_firmware = True
        self.hyperv_enabled = True
        self.files: dict[str, bytes] = files if files is not None else {}
        self.remote_store: dict[str, bytes] = {}  # what URLs and shares serve
        self.faults = HvFaults()
        self.vms: dict[str, HvVm] = {}
        self.races: list[dict[str, Any]] = []  # the parameters of every race, as received
        self.l1: dict[str, dict[str, Any]] = {}
        self.on_l1: Any = None  # called with the name of a new L1 VM (nested Hyper-V tests)
        self.lab = QemuBackend()
        self._lock = threading.Lock()

    def functions(self) -> dict[str, Any]:
        return {
            "Get-TestbedPreflight": self.preflight,
            "Get-TestbedArtifact": self.artifact,
            "New-TestbedVm": self.new_vm,
            "New-TestbedL1Vm": self.new_l1_vm,
            "Start-TestbedVm": self.start_vm,
            "Get-TestbedIcStatus": self.ic_status,
            "Invoke-TestbedRace": self.race,
            "Get-TestbedEvents": self.events,
            "Get-TestbedVmState": self.vm_state,
            "Remove-TestbedVm": self.remove_vm,
            "Get-TestbedOwnedVm": self.owned,
            "Save-TestbedCheckpoint": self.save_checkpoint,
            "Restore-TestbedVm": self.restore_vm,
        }

    def close(self) -> None:
        for v in list(self.vms.values()):
            self.lab.destroy(v.lab)
        self.vms.clear()
        self.lab.close()

    # ---- the module's functions --------------------------------------------------------
    def preflight(self) -> dict[str, Any]:
        return {
            "Build": self.build, "Edition": self.profile.edition, "HyperV": self.hyperv_enabled,
            "HyperVFix": "Install-WindowsFeature -Name Hyper-V -IncludeManagementTools -Restart",
            "AllowFirmwareLoadFromFile": self.allow_firmware, "FreeMemoryMB": 30000,
            "OpenHclSupported": self.build >= 26100, "PowerShell": "5.1",
            "Com3Build": self.build >= COM3_MIN_BUILD, "Com3Key": self.profile.additional_com_ports,
            "Com3Supported": self.build >= COM3_MIN_BUILD and self.profile.additional_com_ports,
        }  # fmt: skip

    def artifact(self, Sha256: str, FileName: str, CacheDir: str, Url: str = "", SharePath: str = "") -> Any:  # noqa: N803
        path = rf"{CacheDir}\{Sha256.lower()}\{FileName}"
        have = self.files.get(path)
        if have is not None and hashlib.sha256(have).hexdigest() == Sha256.lower():
            return {"Path": path, "Pulled": False}
        src = Url or SharePath
        if not self.network and Url:
            raise RuntimeError(
                f"Invoke-WebRequest : The remote name could not be resolved: '{Url.split('/')[2]}'"
            )
        if not self.network and SharePath:
            raise RuntimeError(f"Copy-Item : Access is denied. {SharePath}")
        if src not in self.remote_store:
            raise RuntimeError(
                f"Invoke-WebRequest : The remote server returned an error: (404) Not Found. {src}"
            )
        data = self.remote_store[src]
        got = hashlib.sha256(data).hexdigest()
        if got != Sha256.lower():
            raise RuntimeError(f"artifact {FileName} pulled with sha256 {got}, expected {Sha256}")
        self.files[path] = data
        return {"Path": path, "Pulled": True}

    def new_vm(self, Name: str, IgvmPath: str, VhdPath: str, VmDir: str, Owner: str, MemoryMB: int = 2048,  # noqa: N803
               ProcessorCount: int = 2, FirmwareCommandLine: str = "", Com1Pipe: str = "",  # noqa: N803
               Com3Pipe: str = "", IncreaseVtl2Memory: bool = False) -> Any:  # noqa: N803  # fmt: skip
        for p in (IgvmPath, VhdPath):
            if p not in self.files:
                raise RuntimeError(f"New-VM : Cannot find path '{p}' because it does not exist.")
        if Com3Pipe and not (self.build >= COM3_MIN_BUILD and self.profile.additional_com_ports):
            # Set-VMComPort's [ValidateRange(1, 2)], unless the build has the additional
            # COM ports code path and EnableAdditionalComPorts = 1.
            raise RuntimeError("Set-VMComPort : Cannot validate argument on parameter 'Number'. The 3 argument is "
                               "greater than the maximum allowed range of 2. Supply an argument that is less than "
                               "or equal to 2 and then try the command again.")  # fmt: skip
        vm_id = str(uuid.uuid4())
        lab = self.lab.provision(self.lab_cfg, self.strategy)
        with self._lock:
            self.vms[vm_id] = HvVm(vm_id, Name, f"testbed-owner={Owner}", VmDir, lab, Com1Pipe, Com3Pipe)
        return {"Name": Name, "VmId": vm_id}

    def new_l1_vm(self, Name: str, VhdPath: str, VmDir: str, Owner: str, MemoryMB: int = 8192,  # noqa: N803
                  ProcessorCount: int = 4, HeartbeatTimeoutSecs: int = 600) -> Any:  # noqa: N803  # fmt: skip
        if VhdPath not in self.files:
            raise RuntimeError(f"New-VM : Cannot find path '{VhdPath}' because it does not exist.")
        vm_id = str(uuid.uuid4())
        self.l1[Name] = {"VmId": vm_id, "Owner": Owner, "Path": VmDir, "Memory": MemoryMB}
        if self.on_l1 is not None:
            self.on_l1(Name)
        return {"Name": Name, "VmId": vm_id}

    def _vm(self, vm_id: str) -> HvVm:
        v = self.vms.get(vm_id)
        if v is None:
            raise RuntimeError(f'Get-VM : Hyper-V was unable to find a virtual machine with ID "{vm_id}".')
        return v

    def start_vm(self, VmId: str, IcReadyTimeoutSecs: int = 300) -> Any:  # noqa: N803
        v = self._vm(VmId)
        ready = self.lab.start(v.lab, reset="snapshot")
        v.state = "Running"
        ic = self.faults.ic_status or "OK"
        return {"VmId": VmId, "State": "Running", "Ic": ic, "ReadyMs": int(ready["wall_s"] * 1000)}

    def save_checkpoint(self, VmId: str) -> Any:  # noqa: N803
        v = self._vm(VmId)
        if self.faults.checkpoint_refused:
            raise RuntimeError(f"Checkpoint-VM : Checkpoint operation failed for '{v.name}'. The operation is "
                               "not supported for this virtual machine.")  # fmt: skip
        v.checkpoint = True  # the lab VM's snapshot is what a restore comes back to
        return {"VmId": VmId, "Checkpoint": "testbed-ic-ok"}

    def restore_vm(self, VmId: str, IcReadyTimeoutSecs: int = 300) -> Any:  # noqa: N803
        v = self._vm(VmId)
        if not v.checkpoint:
            raise RuntimeError(f"Get-VMSnapshot : Hyper-V was unable to find a checkpoint named 'testbed-ic-ok' "
                               f"for '{v.name}'.")  # fmt: skip
        self.lab.destroy(v.lab)  # Stop-VM -TurnOff, if it was still running
        v.state = "Off"
        return self.start_vm(VmId, IcReadyTimeoutSecs)

    def ic_status(self, VmId: str) -> Any:  # noqa: N803
        self._vm(VmId)
        return {"VmId": VmId, "Status": self.faults.ic_status or "OK", "Enabled": True}

    def race(self, VmId: str, OffsetMs: float = 0, Options: int = 0, TimeoutHintSecs: int = 60,  # noqa: N803
             Service: bool = True, Shutdown: bool = True, AfterReady: bool = False, GraceMs: float = 5000,  # noqa: N803
             IcReadyTimeoutSecs: int = 120, Com1Pipe: str = "", Com3Pipe: str = "") -> Any:  # noqa: N803  # fmt: skip
        v = self._vm(VmId)
        self.races.append({"VmId": VmId, "OffsetMs": OffsetMs, "Options": Options,
                           "TimeoutHintSecs": TimeoutHintSecs, "Service": Service, "Shutdown": Shutdown})  # fmt: skip
        started = datetime.now(UTC)
        ic = self.faults.ic_at_race or self.faults.ic_status or "OK"
        reload_fails = self.faults.reload_return is not None
        lab_service = Service and not reload_fails
        lab_shutdown = Shutdown and ic == "OK" and not self.faults.shutdown_job_fails
        plan = RacePlan(len(self.races), OffsetMs, lab_service, lab_shutdown,
                        "after-ready" if AfterReady else "offset")  # fmt: skip
        refused = Shutdown and not lab_shutdown  # the module waits no grace after a refused request
        res = self.lab.race(v.lab, plan, 0.0 if refused else GraceMs).raw
        t0 = res.get("t0_ns") or res.get("end_ns", 0)

        def ms(t_ns: float) -> float:
            return SERVICE_MS + (t_ns - t0) / 1e6

        out: dict[str, Any] = {"VmId": VmId, "IcBefore": ic, "OffsetMs": OffsetMs, "StartedUtc": started.isoformat(),
                               "StartMs": 0.0, "FireMs": None, "FireReturn": None, "ServiceMs": None,
                               "ServiceReturn": None, "JobDone": None, "JobState": None, "JobErrorCode": None,
                               "ServiceDoneMs": None}  # fmt: skip
        if Service:
            out["ServiceMs"] = SERVICE_MS
            out["ServiceReturnedMs"] = SERVICE_MS + 1.5
            out["ServiceReturn"] = self.faults.reload_return if reload_fails else 4096
        svc = res.get("svc", {})
        if lab_service:
            if self.faults.job_never_finishes or res.get("servicing_timeout"):
                out.update(JobDone=False, JobState=4, JobErrorCode=None)
            elif self.faults.job_error is not None or svc.get("ok") is False:
                code = self.faults.job_error
                if code is None:
                    code = 0xC0370802 if "save" in str(svc.get("reason", "")) else 0xC0370803
                out.update(JobDone=True, JobState=10, JobErrorCode=code)
            else:
                out.update(JobDone=True, JobState=7, JobErrorCode=0)
            out["ServiceDoneMs"] = ms(svc["done_ns"]) if "done_ns" in svc else ms(res["end_ns"])
        if Shutdown:
            if lab_shutdown and res.get("fire_ns") is not None:
                out.update(FireMs=ms(res["fire_ns"]), FireReturn=0, IcAtFire="OK")
            elif self.faults.shutdown_job_fails:  # accepted as a job, which then fails: nothing was sent
                out.update(FireMs=SERVICE_MS + OffsetMs, FireReturn=4096, IcAtFire=ic, FireJobDone=True,
                           FireJobState=10, FireJobErrorCode=32768,
                           FireJobErrorDescription="The guest did not accept the shutdown request (0x80004005).")  # fmt: skip
            else:  # the IC was not OK: Hyper-V refuses the request, nothing reaches the guest
                out.update(FireMs=SERVICE_MS + OffsetMs, FireReturn=INVALID_STATE, IcAtFire=ic)
        ended = bool(res.get("ended"))
        out["Running"] = not ended
        out["OffMs"] = ms(res["shutdown"]["t_ns"]) if ended and res.get("shutdown") else None
        out["EndMs"] = ms(res["end_ns"])
        out["IcAfter"] = "" if ended else ("OK" if res.get("ic_after") == "ready" else "No Contact")
        com1, com3 = self._serial(res, ms)
        out["Com1"] = com1 if Com1Pipe else []
        out["Com3"] = com3 if Com3Pipe else []
        out["Com1Error"] = out["Com3Error"] = ""
        if self.faults.com1_unreadable and Com1Pipe:
            out["Com1"], out["Com1Error"] = [], "All pipe instances are busy."
        v.events = self._events(res, started, out)
        if ended:
            v.state = "Off"
        return out

    def _serial(self, res: dict[str, Any], ms: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Lab serial lines on the race's clock: VTL0's on COM1 (the shutdown line as Linux's
        hv_utils prints it), the paravisor's on COM3."""
        serial: list[str] = res.get("serial", [])
        svc = res.get("svc", {})
        if "start_ns" in svc and "guest_start_us" in svc:
            host_ns, guest_us = svc["start_ns"], svc["guest_start_us"]
        else:  # no servicing: pair the host's send with the paravisor's relay of the same message
            sent = next((e for e in res.get("host_log", []) if e["kind"] == "sent"), None)
            relay = next((ln for ln in serial if " PV relay " in ln), None)
            if sent is None or relay is None or guest_time_us(relay) is None:
                return [], []
            host_ns, guest_us = sent["t_ns"], guest_time_us(relay)
        com1, com3 = [], []
        for ln in serial:
            g = guest_time_us(ln)
            if g is None or g < guest_us - 2_000_000:
                continue
            at = ms(host_ns + (g - guest_us) * 1000)
            text = ln.split(" ", 2)[2]
            if text.startswith("VTL0 SHUTDOWN"):
                com1.append(
                    {"Ms": at, "Line": "hv_utils: Shutdown request received - graceful shutdown initiated"}
                )
            elif text.startswith("VTL0"):
                com1.append({"Ms": at, "Line": text})
            else:
                com3.append({"Ms": at, "Line": text})
        return com1, com3

    def _events(self, res: dict[str, Any], started: datetime, out: dict[str, Any]) -> list[dict[str, Any]]:
        def when(ms: float | None) -> str:
            return (started + timedelta(milliseconds=ms or 0)).isoformat()

        events = []
        if self.faults.worker_terminated:
            events.append({"Id": 14070, "Log": "Microsoft-Windows-Hyper-V-VMMS-Admin", "TimeUtc": when(out["EndMs"]),
                           "Message": f"The virtual machine '{out['VmId']}' worker process terminated unexpectedly"})  # fmt: skip
        panicked = any(e["event"] == "GUEST_PANICKED" for e in res.get("qmp_events", []))
        if panicked:
            events.append(
                {
                    "Id": 18590,
                    "Log": WORKER_LOG,
                    "TimeUtc": when(out["EndMs"]),
                    "Message": "guest crash report",
                }
            )
        elif out["OffMs"] is not None:
            by_ic = any(c["Line"].startswith("hv_utils: Shutdown request") for c in out["Com1"]) or any(
                "VTL0 SHUTDOWN" in ln for ln in res.get("serial", [])
            )
            eid = 18504 if by_ic else 18502
            events.append(
                {
                    "Id": eid,
                    "Log": WORKER_LOG,
                    "TimeUtc": when(out["OffMs"]),
                    "Message": f"'{out['VmId']}' shut down",
                }
            )
        return events

    def events(self, VmId: str, SinceUtc: str, SettleMs: int = 0) -> Any:  # noqa: N803
        evs = self._vm(VmId).events
        return evs[0] if len(evs) == 1 else evs  # Windows PowerShell 5.1 unwraps one-element arrays

    def vm_state(self, VmId: str) -> Any:  # noqa: N803
        v = self._vm(VmId)
        return {"VmId": VmId, "EnabledState": 3 if v.state == "Off" else 2, "Off": v.state == "Off"}

    def remove_vm(self, VmId: str, VmDir: str = "") -> Any:  # noqa: N803
        with self._lock:
            v = self.vms.pop(VmId, None)
        if v is not None:
            self.lab.destroy(v.lab)
            return {"VmId": VmId, "Removed": True}
        for name, l1 in list(self.l1.items()):
            if l1["VmId"] == VmId:
                del self.l1[name]
                return {"VmId": VmId, "Removed": True}
        return {"VmId": VmId, "Removed": False}

    def owned(self) -> Any:
        out = [{"Name": v.name, "VmId": v.vm_id, "Owner": v.owner.removeprefix("testbed-owner="),
                "State": v.state, "Path": v.path} for v in self.vms.values()]  # fmt: skip
        return out[0] if len(out) == 1 else out

    def adopt(self, name: str, owner: str) -> str:
        """A VM left behind by another (dead) testbed process, for the gc test."""
        vm_id = str(uuid.uuid4())
        lab = self.lab.provision(self.lab_cfg, self.strategy)
        self.vms[vm_id] = HvVm(vm_id, name, f"testbed-owner={owner}", rf"C:\testbed\vms\{name}", lab, "", "")
        return vm_id
