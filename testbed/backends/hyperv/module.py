"""Testbed.psm1 seen from Python: one typed method per module function (petri's shape).

Parameters go in as data; what the host answers is validated into a pydantic
model, so a missing or mistyped field is a ``HostModuleError`` naming the
function, not a KeyError three calls later. Windows PowerShell 5.1 quirks are
absorbed here: a one-element array arrives unwrapped, an empty one as nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_pascal

from testbed.core.errors import InfraError
from testbed.transport.base import TransportError
from testbed.transport.powershell import PowerShellDirect, PowerShellError, PowerShellRunner


def module_source() -> bytes:
    return (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_bytes()


class HostModuleError(InfraError):
    """A module function failed on the host, or answered something unexpected."""

    def __init__(self, function: str, host: str, message: str) -> None:
        super().__init__(f"{function} failed on {host}: {message}")
        self.function = function
        self.host = host


class HostOutput(BaseModel):
    """A module function's answer: PascalCase on the wire, snake_case here; extra fields kept."""

    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True, extra="allow", frozen=True)


class Preflight(HostOutput):
    build: int
    edition: str
    hyper_v: bool
    hyper_v_fix: str
    allow_firmware_load_from_file: bool
    free_memory_mb: int = Field(alias="FreeMemoryMB")
    open_hcl_supported: bool
    com3_supported: bool
    com3_build: bool = False  # the build has the additional-COM-ports code path
    com3_key: bool = False  # EnableAdditionalComPorts = 1
    power_shell: str = ""


class ArtifactPath(HostOutput):
    path: str
    pulled: bool


class CreatedVm(HostOutput):
    name: str
    vm_id: str
    com3: bool | None = None  # New-TestbedVm: COM3 was set (False: not offered, com3_note says why)
    com3_note: str = ""


class StartedVm(HostOutput):
    vm_id: str
    state: str
    ic: str
    ready_ms: int


class Checkpoint(HostOutput):
    vm_id: str
    checkpoint: str


class SerialLine(HostOutput):
    ms: float
    line: str


class IcSample(HostOutput):
    """The shutdown IC read ``state`` at ``ms`` (a change from the sample before)."""

    ms: float
    state: str


def _listify(v: Any) -> Any:
    return [] if v is None else v if isinstance(v, list) else [v]


@dataclass(frozen=True)
class Anchor:
    """What ``Invoke-TestbedRace`` fires after: ``line`` (the first line of ``port``
    matching ``pattern``, a .NET regex), ``job-done`` or ``ic-ready``."""

    kind: Literal["line", "job-done", "ic-ready"]
    port: str = ""
    pattern: str = ""


class RaceOutcome(HostOutput):
    """``Invoke-TestbedRace``: every time is ms on the race's one host Stopwatch. The two
    WMI calls run on their own threads; each is stamped when it was made (``service_ms``,
    ``fire_ms``) and when it returned (``service_returned_ms``, ``fire_returned_ms``)."""

    vm_id: str
    ic_before: str
    offset_ms: float
    started_utc: str
    start_ms: float = 0.0
    service_ms: float | None = None
    service_returned_ms: float | None = None
    service_return: int | None = None
    service_error: str = ""  # ReloadManagementVtl threw, or had not returned by TimeoutHintSecs + 30 s
    job_done: bool | None = None
    job_state: int | None = None
    job_error_code: int | None = None
    job_error_description: str = ""
    service_done_ms: float | None = None
    fire_ms: float | None = None
    fire_returned_ms: float | None = None
    fire_return: int | None = None
    fire_job_done: bool | None = None  # InitiateShutdown returned 4096 with a Job (it documents none): polled
    fire_job_state: int | None = None
    fire_job_error_code: int | None = None
    fire_job_error_description: str = ""
    ic_at_fire: str | None = None
    off_ms: float | None = None
    end_ms: float | None = None
    running: bool
    ic_after: str = ""
    com1: list[SerialLine] = []
    com3: list[SerialLine] = []
    com1_error: str = ""
    com3_error: str = ""
    # A shot after an anchor (FireAfter line, job-done or ic-ready): when the anchor came,
    # how late its stamp may be (the gap between two samples; 0 for a line, stamped on
    # arrival), why it never came, and the shot's plan (anchor + offset).
    fire_after: str = "request"
    anchor_ms: float | None = None
    anchor_resolution_ms: float | None = None
    anchor_missing: str = ""
    fire_planned_ms: float | None = None
    ic_transitions: list[IcSample] = []  # the shutdown IC's state changes while waiting for ic-ready

    @field_validator("com1", "com3", "ic_transitions", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _listify(v)


class WorkerEvent(HostOutput):
    id: int
    time_utc: str
    message: str = ""
    log: str = ""  # Worker-Admin or VMMS-Admin


class OwnedVm(HostOutput):
    name: str
    vm_id: str
    owner: str
    state: str = ""
    path: str = ""


class ServicingIgvm(HostOutput):
    vm_id: str
    sha256: str  # of the VM's firmware file after the copy: what the next servicing loads


class Removed(HostOutput):
    vm_id: str
    removed: bool


M = TypeVar("M", bound=HostOutput)


class HostModule:
    """The module on one host (L0, or an L1 reached by PowerShell Direct), uploaded on
    first use under ``host_dir`` by content hash, so a changed module is a new file."""

    def __init__(self, runner: PowerShellRunner, host_dir: str = r"C:\testbed") -> None:
        self.runner = runner
        self.host_dir = host_dir
        self._uploaded: str | None = None

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def path(self) -> str:
        digest = hashlib.sha256(module_source()).hexdigest()[:12]
        return rf"{self.host_dir}\modules\Testbed-{digest}.psm1"

    def upload(self, data: bytes | Path, remote: str, sha256: str | None = None) -> bool:
        try:
            return self.runner.upload(data, remote, sha256)
        except (PowerShellError, TransportError) as e:
            raise HostModuleError("upload", self.name, f"{remote}: {e}") from None

    def copy_in(self, src_on_l0: str, remote: str, sha256: str) -> None:
        """Nested: copy a file that is in L0's cache into this (L1) host, hash-checked there."""
        if not isinstance(self.runner, PowerShellDirect):
            raise TypeError("copy_in is for a module reached through PowerShell Direct")
        try:
            got = self.runner.copy_in(src_on_l0, remote, sha256)
        except (PowerShellError, TransportError) as e:
            raise HostModuleError("copy into L1", self.name, f"{remote}: {e}") from None
        if got != sha256:
            raise HostModuleError("copy into L1", self.name, f"{remote} came out with sha256 {got}")

    def _raw(self, function: str, params: dict[str, Any]) -> Any:
        try:
            if self._uploaded != self.path:
                self.runner.upload(module_source(), self.path)
                self._uploaded = self.path
            return self.runner.invoke(self.path, function, params)
        except PowerShellError as e:
            raise HostModuleError(function, self.name, str(e)) from None
        except TransportError as e:
            raise HostModuleError(function, self.name, f"{type(e).__name__}: {e}") from None

    def _one(self, function: str, model: type[M], **params: Any) -> M:
        raw = self._raw(function, params)
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            raise HostModuleError(function, self.name, f"unexpected answer ({e.error_count()} problems): "
                                  f"{e.errors()[0]['loc']} {e.errors()[0]['msg']}; got {str(raw)[:200]}") from None  # fmt: skip

    def _many(self, function: str, model: type[M], **params: Any) -> list[M]:
        raw = _listify(self._raw(function, params))
        try:
            return [model.model_validate(x) for x in raw]
        except ValidationError as e:
            raise HostModuleError(function, self.name, f"unexpected answer: {e.errors()[0]['msg']}") from None

    # ---- one method per module function ----------------------------------------------------
    def preflight(self) -> Preflight:
        return self._one("Get-TestbedPreflight", Preflight)

    def pull_artifact(self, sha256: str, file_name: str, url: str = "", share: str = "") -> ArtifactPath:
        return self._one("Get-TestbedArtifact", ArtifactPath, Sha256=sha256, FileName=file_name,
                         CacheDir=rf"{self.host_dir}\cache", Url=url, SharePath=share)  # fmt: skip

    def new_vm(self, name: str, igvm_path: str, vhd_path: str, vm_dir: str, owner: str, *, memory_mb: int,
               processors: int, firmware_cmdline: str, com1_pipe: str, com3_pipe: str,
               increase_vtl2_memory: bool = False) -> CreatedVm:  # fmt: skip
        return self._one("New-TestbedVm", CreatedVm, Name=name, IgvmPath=igvm_path, VhdPath=vhd_path,
                         VmDir=vm_dir, Owner=owner, MemoryMB=memory_mb, ProcessorCount=processors,
                         FirmwareCommandLine=firmware_cmdline, Com1Pipe=com1_pipe, Com3Pipe=com3_pipe,
                         IncreaseVtl2Memory=increase_vtl2_memory)  # fmt: skip

    def new_l1_vm(self, name: str, vhd_path: str, vm_dir: str, owner: str, *, memory_mb: int, processors: int,
                  heartbeat_timeout_s: int) -> CreatedVm:  # fmt: skip
        return self._one("New-TestbedL1Vm", CreatedVm, Name=name, VhdPath=vhd_path, VmDir=vm_dir, Owner=owner,
                         MemoryMB=memory_mb, ProcessorCount=processors,
                         HeartbeatTimeoutSecs=heartbeat_timeout_s)  # fmt: skip

    def start_vm(self, vm_id: str, ic_ready_timeout_s: int) -> StartedVm:
        return self._one("Start-TestbedVm", StartedVm, VmId=vm_id, IcReadyTimeoutSecs=ic_ready_timeout_s)

    def save_checkpoint(self, vm_id: str) -> None:
        self._one("Save-TestbedCheckpoint", Checkpoint, VmId=vm_id)

    def restore_vm(self, vm_id: str, ic_ready_timeout_s: int) -> StartedVm:
        return self._one("Restore-TestbedVm", StartedVm, VmId=vm_id, IcReadyTimeoutSecs=ic_ready_timeout_s)

    def race(self, vm_id: str, *, offset_ms: float, options: int, timeout_hint_secs: int, service: bool,
             shutdown: bool, after_ready: bool, grace_ms: float, ic_ready_timeout_s: int, com1_pipe: str,
             com3_pipe: str, anchor: Anchor | None = None) -> RaceOutcome:  # fmt: skip
        """``anchor``: fire ``offset_ms`` after it instead of after the servicing call's start."""
        extra: dict[str, Any] = {}
        if anchor is not None:
            extra["FireAfter"] = anchor.kind
            if anchor.kind == "line":
                extra.update(AnchorPort=anchor.port, AnchorPattern=anchor.pattern)
        return self._one("Invoke-TestbedRace", RaceOutcome, VmId=vm_id, OffsetMs=offset_ms, Options=options,
                         TimeoutHintSecs=timeout_hint_secs, Service=service, Shutdown=shutdown,
                         AfterReady=after_ready, GraceMs=grace_ms, IcReadyTimeoutSecs=ic_ready_timeout_s,
                         Com1Pipe=com1_pipe, Com3Pipe=com3_pipe, **extra)  # fmt: skip

    def events(self, vm_id: str, since_utc: str, settle_ms: int = 0) -> list[WorkerEvent]:
        return self._many(
            "Get-TestbedEvents", WorkerEvent, VmId=vm_id, SinceUtc=since_utc, SettleMs=settle_ms
        )

    def set_servicing_igvm(self, vm_id: str, vm_dir: str, igvm_path: str) -> ServicingIgvm:
        return self._one(
            "Set-TestbedServicingIgvm", ServicingIgvm, VmId=vm_id, VmDir=vm_dir, IgvmPath=igvm_path
        )

    def remove_vm(self, vm_id: str, vm_dir: str = "") -> Removed:
        return self._one("Remove-TestbedVm", Removed, VmId=vm_id, VmDir=vm_dir)

    def owned_vms(self) -> list[OwnedVm]:
        return self._many("Get-TestbedOwnedVm", OwnedVm)
