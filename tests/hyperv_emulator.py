"""An emulated Hyper-V host for the tests: Testbed.psm1's functions, answered by VMs of
the reference lab (real QEMU guests, serviced and shut down through the lab).

With ``guest="model"`` there is no QEMU: the race is timed for real on this process's
clock, following what the uploaded Testbed.psm1 does (read from its text), and the guest
is Hyper-V's (a shutdown fired during servicing is held and delivered after it). With
the lab, Hyper-V's view is derived from the lab's evidence the way a real host would
show it: ReloadManagementVtl returns 4096 and a job whose state follows the
paravisor's servicing report; InitiateShutdown returns 0 while the IC is OK and
32775 (invalid state) otherwise; the VM's end becomes event 18504 (shut down
through the IC) or 18590 (guest crash); the guest's VTL0 lines are COM1 and the
paravisor's lines COM3, all on one millisecond clock of the race. Faults are
injected on demand. This file is test support, not product code.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from testbed.backends.qemu.backend import QemuBackend, QemuVm
from testbed.backends.qemu.evidence import guest_time_us
from testbed.core.config import VmConfig
from testbed.core.evidence import RacePlan

SERVICE_MS = 5.0  # where the emulated race's Stopwatch is when servicing is requested
INVALID_STATE = 32775
JOB_STARTED = 4096
WORKER_LOG = "Microsoft-Windows-Hyper-V-Worker-Admin"
COM3_MIN_BUILD = 27653  # the additional-COM-ports code path (petri's check)
# A file's DACL is at most 64 KiB (ACL.AclSize is a WORD). An ACCESS_ALLOWED_ACE for a VM's
# SID (NT VIRTUAL MACHINE\<GUID> = S-1-5-83-1-a-b-c-d, 28 bytes) takes 4 + 4 + 28 = 36 bytes,
# after the 8-byte ACL header: about 1,800 VMs fill the ACL of a file every VM is granted on.
ACL_MAX_BYTES = 65535
ACL_HEADER_BYTES = 8
VM_ACE_BYTES = 36
# What icacls prints when the ACL cannot take one more ACE (ERROR_ALLOTTED_SPACE_EXCEEDED).
ACL_FULL = "No more memory is available for security information updates."


# The modeled servicing, as OpenHCL prints it on COM3 and as the host's shutdown IC shows it:
# (fraction of the job's duration after the servicing call's start, the line). The IC's
# channel is closed (by the save) at IC_CLOSE and open again at IC_REOPEN of the job, when
# ``servicing_closes_ic`` (VMBus redirection: OpenHCL's own channel to the host's IC).
OPENHCL_LINES = (
    (0.04, "[  12.100000] underhill_core::dispatch: INFO received servicing request from host"),
    (0.08, "[  12.110000] underhill_core::dispatch: INFO stopping VM"),
    (0.50, "[   0.700000] underhill_core::worker: INFO VTL2 restart, getting servicing state from the host"),
    (
        0.55,
        "[   0.710000] underhill_core::worker: INFO received servicing state from host saved_state_len=0x4000",
    ),
    (0.80, "[   0.900000] underhill_core::dispatch: INFO resuming VM blackout_time_ms=0x120"),
)
IC_CLOSE, IC_REOPEN = 0.20, 1.10  # the window [0.04, 0.20) is 64 ms at a 400 ms job: wide
# enough that a shot delayed by a loaded CI machine's scheduler still lands where planned
CIM_SAMPLE_MS = 3.0  # one Get-CimInstance of the IC's state or of a job, modeled


# ---- what the uploaded Testbed.psm1 does, read from its text ------------------------------
# The emulated host answers the module's functions itself, so where the answer depends on
# how the module is written (which thread calls what, what it reads, which file it grants
# on), it reads that from the module the controller uploaded, parsed with
# tree-sitter-powershell: the emulated host then behaves as the real one would with that
# module, and an old module fails here as it would on Windows.


@dataclass(frozen=True)
class Psm1Facts:
    race_concurrent: bool  # Invoke-TestbedRace gives the servicing call and the shot a thread each
    reads_shutdown_job: bool  # reads .Job of InitiateShutdown's result (it has no Job out parameter)
    igvm_acl_per_vm: bool  # icacls grants the VM on its own copy of the IGVM, not the shared file
    com3_by_wmi: bool  # COM3 through Msvm_SerialPortSettingData, not Set-VMComPort -Number 3


def _parse(text: str) -> tuple[Any, bytes]:
    import tree_sitter as ts
    import tree_sitter_powershell as tsp

    src = text.encode()
    return ts.Parser(ts.Language(tsp.language())).parse(src).root_node, src


def _walk(n: Any) -> Iterator[Any]:
    yield n
    for c in n.children:
        yield from _walk(c)


def _text(n: Any, src: bytes) -> str:
    return src[n.start_byte : n.end_byte].decode()


def _command_name(cmd: Any, src: bytes) -> str:
    """A command's name, also behind the call operator (``& icacls.exe ...``)."""
    for c in cmd.children:
        if c.type == "command_name":
            return _text(c, src)
        if c.type == "command_name_expr":
            return next((_text(n, src) for n in c.children if n.type == "command_name"), "")
    return ""


def _method_name(cmd: Any, src: bytes) -> str:
    """The -MethodName of an Invoke-CimMethod command ('' if none)."""
    el = next((c for c in cmd.children if c.type == "command_elements"), None)
    parts = [c for c in (el.children if el is not None else []) if c.type != "command_argument_sep"]
    for i, p in enumerate(parts[:-1]):
        if p.type == "command_parameter" and _text(p, src).lstrip("-").rstrip(":").lower() == "methodname":
            return _text(parts[i + 1], src).strip("'\"")
    return ""


def _functions(root: Any, src: bytes) -> dict[str, Any]:
    out = {}
    for n in _walk(root):
        if n.type == "function_statement":
            out[next(_text(c, src) for c in n.children if c.type == "function_name")] = n
    return out


def _runspace_scripts(root: Any, src: bytes) -> list[Any]:
    """Script blocks that run on a runspace of their own: module-level ``$script:X = { }``
    whose variable is handed to ``.AddScript(...)`` somewhere in the module."""
    added = {
        _text(v, src).lower()
        for n in _walk(root)
        if n.type == "invokation_expression" and _member(n, src) == "addscript"
        for v in _walk(n)
        if v.type == "variable"
    }
    blocks = []
    for n in _walk(root):
        if n.type != "assignment_expression":
            continue
        left = next((c for c in n.children if c.type == "left_assignment_expression"), None)
        var = next((v for v in _walk(left) if v.type == "variable"), None) if left is not None else None
        if var is None or _text(var, src).lower() not in added:
            continue
        blocks += [b for b in _walk(n) if b.type == "script_block_expression"][:1]
    return blocks


def _member(n: Any, src: bytes) -> str:
    """The method an invokation_expression calls (lower case), '' for a static type call."""
    name = next((c for c in n.children if c.type == "member_name"), None)
    return _text(name, src).lower() if name is not None else ""


def _inside(n: Any, blocks: list[Any]) -> bool:
    return any(b.start_byte <= n.start_byte and n.end_byte <= b.end_byte for b in blocks)


def _events(
    n: Any, src: bytes, fns: dict[str, Any], runspace: list[Any], seen: frozenset[str]
) -> Iterator[str]:
    """What a function does, in order, as seen from its caller's thread: 'begin'/'end' (a
    runspace started / waited for), 'service'/'shot' (the WMI call made on this thread),
    'service@runspace'/'shot@runspace' (made by a runspace script). Calls into the module's
    own functions are followed."""
    if n.type == "command":
        name = _command_name(n, src)
        if name == "Invoke-CimMethod":
            kind = {"ReloadManagementVtl": "service", "InitiateShutdown": "shot"}.get(_method_name(n, src))
            if kind:
                yield kind + ("@runspace" if _inside(n, runspace) else "")
        elif name in fns and name not in seen:
            yield from _events(fns[name], src, fns, runspace, seen | {name})
    if n.type == "invokation_expression":
        m = _member(n, src)
        if m == "begininvoke":
            yield "begin"
        elif m in ("endinvoke", "invoke"):
            yield "end"
    for c in n.children:
        yield from _events(c, src, fns, runspace, seen)


def race_concurrent(text: str) -> bool:
    """Does Invoke-TestbedRace start a runspace for one of the two calls before the other
    is made on its own thread, so that neither waits for the other to return?"""
    root, src = _parse(text)
    fns = _functions(root, src)
    runspace = _runspace_scripts(root, src)
    scripted = {e for b in runspace for e in _events(b, src, fns, runspace, frozenset())}
    if "Invoke-TestbedRace" not in fns:
        return False
    seq = list(_events(fns["Invoke-TestbedRace"], src, fns, runspace, frozenset({"Invoke-TestbedRace"})))
    for mine, other in (("shot", "service@runspace"), ("service", "shot@runspace")):
        if other not in scripted:
            continue
        for i, e in enumerate(seq):
            if e == "begin" and mine in seq[i + 1 :]:
                j = seq.index(mine, i + 1)
                if "end" not in seq[i + 1 : j]:
                    return True
    return False


def reads_shutdown_job(text: str) -> bool:
    """Does the module read ``.Job`` of InitiateShutdown's result? Under Set-StrictMode -Version
    3 that throws: InitiateShutdown has no Job out parameter (Msvm_ShutdownComponent)."""
    root, src = _parse(text)
    for n in _walk(root):
        if n.type != "assignment_expression":
            continue
        cmds = [c for c in _walk(n) if c.type == "command" and _command_name(c, src) == "Invoke-CimMethod"]
        if not cmds or _method_name(cmds[0], src) != "InitiateShutdown":
            continue
        var = _text(next(v for v in _walk(n) if v.type == "variable"), src).lower()
        block = n.parent
        while block is not None and block.type != "script_block":
            block = block.parent
        for m in _walk(block if block is not None else root):
            if m.type == "member_access" and m.start_byte > n.end_byte:
                obj = m.children[0]
                name = next((c for c in m.children if c.type == "member_name"), None)
                if obj.type == "variable" and _text(obj, src).lower() == var and name is not None \
                        and _text(name, src).lower() == "job":  # fmt: skip
                    return True
    return False


def igvm_acl_per_vm(text: str) -> bool:
    """Does New-TestbedVm grant the VM on a per-VM copy of the IGVM (removed with the VM's
    folder), rather than on the shared cached file (where every grant stays forever)?"""
    root, src = _parse(text)
    fn = _functions(root, src).get("New-TestbedVm")
    if fn is None:
        return False
    copied = set()
    granted = []
    for c in _walk(fn):
        if c.type != "command":
            continue
        name = _command_name(c, src)
        el = next((x for x in c.children if x.type == "command_elements"), None)
        args = [x for x in (el.children if el is not None else []) if x.type != "command_argument_sep"]
        if name == "Copy-Item":
            for i, a in enumerate(args[:-1]):
                if a.type == "command_parameter" and _text(a, src).lower() == "-destination":
                    copied.add(_text(args[i + 1], src).lower())
        if name == "icacls.exe" and args:
            granted.append(_text(args[0], src).lower())
    return bool(granted) and all(g in copied and g != "$igvmpath" for g in granted)


def function_parameters(text: str) -> dict[str, dict[str, tuple[str, ...] | None]]:
    """Each function's declared parameters (lower case) and, for a ValidateSet, its values:
    what PowerShell binds a call's named arguments against."""
    root, src = _parse(text)
    out: dict[str, dict[str, tuple[str, ...] | None]] = {}
    for name, fn in _functions(root, src).items():
        block = next((n for n in _walk(fn) if n.type == "param_block"), None)
        params: dict[str, tuple[str, ...] | None] = {}
        for sp in [n for n in _walk(block) if n.type == "script_parameter"] if block is not None else []:
            var = next(c for c in sp.children if c.type == "variable")
            allowed = None
            for at in (a for a in _walk(sp) if a.type == "attribute"):
                if _text(at, src).lower().startswith("[validateset("):
                    args = [a for a in _walk(at) if a.type == "attribute_argument"]
                    allowed = tuple(_text(a, src).strip("'\"") for a in args)
            params[_text(var, src).lstrip("$").lower()] = allowed
        out[name] = params
    return out


def binding_error(params: dict[str, tuple[str, ...] | None], given: dict[str, Any]) -> str | None:
    """PowerShell's refusal of named arguments a function does not declare, or of a value
    outside a ValidateSet (case-insensitive, as PowerShell compares); None when they bind."""
    for k, v in given.items():
        if k.lower() not in params:
            return f"A parameter cannot be found that matches parameter name '{k}'."
        allowed = params[k.lower()]
        if allowed is not None and str(v).lower() not in {a.lower() for a in allowed}:
            return (f"Cannot validate argument on parameter '{k}'. The argument \"{v}\" does not belong to the "
                    f"set \"{','.join(allowed)}\" specified by the ValidateSet attribute.")  # fmt: skip
    return None


def com3_by_wmi(text: str) -> bool:
    code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
    return "Msvm_SerialPortSettingData" in code and not re.search(r"Set-VMComPort\b[^\n]*-Number\s+3", code)


def psm1_facts(text: str) -> Psm1Facts:
    return Psm1Facts(
        race_concurrent(text), reads_shutdown_job(text), igvm_acl_per_vm(text), com3_by_wmi(text)
    )


@dataclass(frozen=True)
class HostProfile:
    """What differs between the Windows hosts testbed meets, for the rules the emulated
    host enforces (execution policy, COM3)."""

    name: str
    build: int
    edition: str  # client | server
    execution_policy: str  # the machine default: Restricted on client SKUs
    additional_com_ports: bool = False  # EnableAdditionalComPorts = 1 (where the build has it)
    gpo_policy: str | None = None  # an execution policy set by Group Policy (wins over every other scope)
    oem_codepage: int = 437  # what Windows PowerShell 5.1 writes to a redirected stdout (SSH, local)

    @property
    def serial_ports(self) -> int:
        """Msvm_SerialPortSettingData instances of a new Gen2 VM: COM1 and COM2, and COM3
        only where the build has the additional COM ports and the key is set."""
        return 3 if self.build >= COM3_MIN_BUILD and self.additional_com_ports else 2


PROFILES = {
    p.name: p
    for p in (
        HostProfile("win11-24h2", 26100, "client", "Restricted"),
        HostProfile("win11-25h2", 26200, "client", "Restricted"),
        HostProfile("server-2025", 26100, "server", "RemoteSigned"),
        HostProfile("win11-26h1", 28000, "client", "Restricted", additional_com_ports=True),
        # A domain host whose Group Policy sets RemoteSigned (a German one: OEM code page 850).
        HostProfile(
            "server-2025-gpo", 26100, "server", "RemoteSigned", gpo_policy="RemoteSigned", oem_codepage=850
        ),
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
    # InitiateShutdown returns 4096 (Method Parameters Checked - Job Started), as its ValueMap
    # allows; the method has no Job out parameter, so there is no job to read or poll.
    shutdown_returns_4096: bool = False


@dataclass
class HvVm:
    vm_id: str
    name: str
    owner: str
    path: str
    lab: QemuVm | None  # None: a modeled guest (no QEMU)
    com1_pipe: str
    com3_pipe: str
    state: str = "Off"
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: bool = False


class EmulatedHyperV:
    """``guest="lab"``: each VM is a reference-lab QEMU guest (tests marked ``vm``).
    ``guest="model"``: no QEMU; the race is timed for real on this process's clock the way
    the uploaded module times it (``service_call_ms``: how long ReloadManagementVtl's WMI
    call takes to return, ``job_ms`` until its job completes, ``shutdown_call_ms`` for
    InitiateShutdown), and the guest is Hyper-V's: a shutdown fired inside servicing is
    held and delivered once servicing is done."""

    def __init__(self, lab_cfg: VmConfig, strategy: str = "none", *, profile: HostProfile = PROFILES["server-2025"],
                 files: dict[str, bytes] | None = None, network: bool = True, guest: str = "lab") -> None:  # fmt: skip
        self.lab_cfg = lab_cfg
        self.guest = guest
        self.service_call_ms = 1.5
        self.job_ms = 50.0
        # The modeled servicing (guest="model"): the IC's channel closed by the save and open
        # again after it (VMBus redirection), and the IGVM files (by name) whose OpenHCL loses
        # a request taken before that close (#954, before the fix in #962).
        self.servicing_closes_ic = False
        self.lossy_builds: tuple[str, ...] = ()
        self.vm_igvm: dict[str, str] = {}  # VM id -> the IGVM path it boots
        self.shutdown_call_ms = 1.0
        self.inherited_aces = 4  # ACEs a file in the cache starts with (SYSTEM, Administrators, ...)
        # Serial ports of a new VM when not what the profile says (EnableAdditionalComPorts set
        # but VMMS not restarted; an ARM64 host, whose Hyper-V has no COM3).
        self.serial_ports: int | None = None
        self.acl: dict[str, list[str]] = {}  # path -> the VM accounts granted on it by icacls
        # False for a nested L1 VM: its adapter is on no switch, and a share opened in a
        # remote session there is a second hop (no credentials to pass on).
        self.network = network
        self.strategy = strategy
        self.profile = profile
        self.build = profile.build
        self.allow_firmware = True
        self.free_memory_mb = 30000
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
            "Set-TestbedServicingIgvm": self.set_servicing_igvm,
            "Get-TestbedEvents": self.events,
            "Get-TestbedVmState": self.vm_state,
            "Remove-TestbedVm": self.remove_vm,
            "Get-TestbedOwnedVm": self.owned,
            "Save-TestbedCheckpoint": self.save_checkpoint,
            "Restore-TestbedVm": self.restore_vm,
        }

    def close(self) -> None:
        for v in list(self.vms.values()):
            if v.lab is not None:
                self.lab.destroy(v.lab)
        self.vms.clear()
        self.lab.close()

    def module_facts(self) -> Psm1Facts:
        """What the module the controller uploaded does (the newest Testbed-*.psm1 in the
        host's files; the packaged one when nothing was uploaded)."""
        text = next((self.files[k].decode(errors="replace") for k in reversed(list(self.files))
                     if "\\modules\\Testbed-" in k and k.endswith(".psm1")), None)  # fmt: skip
        if text is None:
            text = (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_text()
        return psm1_facts(text)

    def _grant(self, path: str, account: str) -> None:
        """icacls PATH /grant ACCOUNT: one more ACE, unless the ACL is full."""
        aces = self.acl.setdefault(path, [])
        if account in aces:  # icacls merges the rights into the account's ACE: no second ACE
            return
        size = ACL_HEADER_BYTES + VM_ACE_BYTES * (self.inherited_aces + len(aces) + 1)
        if size > ACL_MAX_BYTES:
            raise RuntimeError(f"icacls could not grant {account} on {path} (exit 1): {path}: {ACL_FULL}")
        aces.append(account)

    # ---- the module's functions --------------------------------------------------------
    def preflight(self) -> dict[str, Any]:
        return {
            "Build": self.build, "Edition": self.profile.edition, "HyperV": self.hyperv_enabled,
            "HyperVFix": "Install-WindowsFeature -Name Hyper-V -IncludeManagementTools -Restart",
            "AllowFirmwareLoadFromFile": self.allow_firmware, "FreeMemoryMB": self.free_memory_mb,
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
        facts = self.module_facts()
        ports = self.serial_ports if self.serial_ports is not None else HostProfile(
            self.profile.name, self.build, self.profile.edition, self.profile.execution_policy,
            self.profile.additional_com_ports).serial_ports  # fmt: skip
        com3, note = bool(Com3Pipe), ""
        if Com3Pipe and ports < 3:
            if facts.com3_by_wmi:  # the module counts the VM's Msvm_SerialPortSettingData and goes without
                com3, note = False, f"COM3 is not offered on this host: a new VM has {ports} serial ports " \
                                    "(Msvm_SerialPortSettingData)"  # fmt: skip
            else:
                # Set-VMComPort's [ValidateRange(1, 2)], unless the build has the additional
                # COM ports code path and EnableAdditionalComPorts = 1.
                raise RuntimeError("Set-VMComPort : Cannot validate argument on parameter 'Number'. The 3 argument "
                                   "is greater than the maximum allowed range of 2. Supply an argument that is less "
                                   "than or equal to 2 and then try the command again.")  # fmt: skip
        vm_id = str(uuid.uuid4())
        # The worker runs as NT VIRTUAL MACHINE\<id>, which icacls grants on the IGVM file.
        account = "NT VIRTUAL MACHINE\\" + vm_id.upper() + ":R"
        if facts.igvm_acl_per_vm:  # a copy in the VM's folder: its ACE goes with the folder
            copy = VmDir + "\\igvm.bin"
            self.files[copy] = self.files[IgvmPath]
            self._grant(copy, account)
        else:  # the shared cached file: every VM leaves its ACE there for good
            self._grant(IgvmPath, account)
        lab = self.lab.provision(self.lab_cfg, self.strategy) if self.guest == "lab" else None
        self.vm_igvm[vm_id] = IgvmPath
        with self._lock:
            self.vms[vm_id] = HvVm(
                vm_id, Name, f"testbed-owner={Owner}", VmDir, lab, Com1Pipe, Com3Pipe if com3 else ""
            )
        if not facts.com3_by_wmi:  # the old module answered Name and VmId only
            return {"Name": Name, "VmId": vm_id}
        return {"Name": Name, "VmId": vm_id, "Com3": com3, "Com3Note": note}

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
        ready = self.lab.start(v.lab, reset="snapshot") if v.lab is not None else {"wall_s": 0.0}
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
        if v.lab is not None:
            self.lab.destroy(v.lab)  # Stop-VM -TurnOff, if it was still running
        v.state = "Off"
        return self.start_vm(VmId, IcReadyTimeoutSecs)

    def set_servicing_igvm(self, VmId: str, VmDir: str, IgvmPath: str) -> Any:  # noqa: N803
        """Copy-Item over the VM's own firmware file, then icacls: the next servicing loads it."""
        self._vm(VmId)
        own = VmDir + "\\igvm.bin"
        if own not in self.files:
            raise RuntimeError(
                f"the VM's firmware file {own} is not there (a VM made by New-TestbedVm has it)"
            )
        if IgvmPath not in self.files:
            raise RuntimeError(f"Copy-Item : Cannot find path '{IgvmPath}' because it does not exist.")
        self.files[own] = self.files[IgvmPath]
        self._grant(own, "NT VIRTUAL MACHINE\\" + VmId.upper() + ":R")
        self.vm_igvm[VmId] = IgvmPath
        return {"VmId": VmId, "Sha256": hashlib.sha256(self.files[own]).hexdigest()}

    def ic_status(self, VmId: str) -> Any:  # noqa: N803
        self._vm(VmId)
        return {"VmId": VmId, "Status": self.faults.ic_status or "OK", "Enabled": True}

    def race(self, VmId: str, OffsetMs: float = 0, Options: int = 0, TimeoutHintSecs: int = 60,  # noqa: N803
             Service: bool = True, Shutdown: bool = True, AfterReady: bool = False, GraceMs: float = 5000,  # noqa: N803
             IcReadyTimeoutSecs: int = 120, Com1Pipe: str = "", Com3Pipe: str = "", FireAfter: str = "request",  # noqa: N803
             AnchorPort: str = "", AnchorPattern: str = "") -> Any:  # noqa: N803  # fmt: skip
        v = self._vm(VmId)
        self.races.append({"VmId": VmId, "OffsetMs": OffsetMs, "Options": Options, "FireAfter": FireAfter,
                           "TimeoutHintSecs": TimeoutHintSecs, "Service": Service, "Shutdown": Shutdown})  # fmt: skip
        anchored = Shutdown and Service and not AfterReady and FireAfter != "request"
        if FireAfter != "request" and Shutdown and not AfterReady and (not Service or OffsetMs < 0):
            raise RuntimeError(
                f"a shot after a servicing anchor ({FireAfter}) needs servicing and OffsetMs >= 0"
            )
        if anchored and FireAfter == "line" and not ({"Com1": Com1Pipe, "Com3": Com3Pipe}.get(AnchorPort)):
            raise RuntimeError(
                "a shot after a serial line needs AnchorPort Com1 or Com3 and that port's pipe"
            )
        if anchored and FireAfter == "line":
            re.compile(AnchorPattern)  # [regex]$AnchorPattern (.NET), before anything starts
        if anchored and v.lab is not None:
            raise RuntimeError(
                "test support: the lab-guest emulation does not model anchored shots (guest='model')"
            )
        facts = self.module_facts()
        if Shutdown and self.faults.shutdown_returns_4096 and facts.reads_shutdown_job:
            # Set-StrictMode -Version 3: reading an out parameter the method does not have.
            raise RuntimeError(
                "The property 'Job' cannot be found on this object. Verify that the property exists."
            )
        if v.lab is None:
            anchor = (FireAfter, AnchorPattern) if anchored else None
            return self._model_race(
                v, facts, OffsetMs, Service, Shutdown, AfterReady, Com1Pipe, Com3Pipe, anchor
            )
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
                rv = JOB_STARTED if self.faults.shutdown_returns_4096 else 0
                out.update(FireMs=ms(res["fire_ns"]), FireReturn=rv, IcAtFire="OK")
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
        for path in [p for p in self.files if VmDir and p.startswith(VmDir + "\\")]:
            del self.files[path]  # Remove-Item -Recurse of the VM's folder (a per-VM IGVM copy too)
            self.acl.pop(path, None)
        if v is not None:
            if v.lab is not None:
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
        lab = self.lab.provision(self.lab_cfg, self.strategy) if self.guest == "lab" else None
        self.vms[vm_id] = HvVm(vm_id, name, f"testbed-owner={owner}", rf"C:\testbed\vms\{name}", lab, "", "")
        return vm_id

    # ---- the modeled guest: the race timed for real, as the uploaded module times it --------
    def _model_race(self, v: HvVm, facts: Psm1Facts, offset: float, service: bool, shutdown: bool,
                    after_ready: bool, com1_pipe: str, com3_pipe: str = "",
                    anchor: tuple[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        """The race timed for real. With ``anchor`` (FireAfter, AnchorPattern) the shot
        follows the anchor as Wait-TestbedAnchor finds it: a COM3 line at its arrival, the
        job's end or the IC's return to OK at the end of the sample that saw it."""
        clock = _Clock()
        started = datetime.now(UTC)
        ic = self.faults.ic_at_race or self.faults.ic_status or "OK"
        out: dict[str, Any] = {"VmId": v.vm_id, "IcBefore": ic, "OffsetMs": offset, "StartedUtc": started.isoformat(),
                               "StartMs": 0.0, "FireMs": None, "FireReturnedMs": None, "FireReturn": None,
                               "ServiceMs": None, "ServiceReturnedMs": None, "ServiceReturn": None,
                               "ServiceError": "", "JobDone": None, "JobState": None, "JobErrorCode": None,
                               "ServiceDoneMs": None, "IcAtFire": None, "FireAfter": "request", "AnchorMs": None,
                               "AnchorResolutionMs": None, "AnchorMissing": "", "FirePlannedMs": None,
                               "IcTransitions": []}  # fmt: skip
        if anchor is not None:
            t = self._anchored(clock, out, anchor, offset)
        else:
            t = _timed(clock, facts.race_concurrent, offset, service, shutdown and not after_ready,
                       self.service_call_ms, self.shutdown_call_ms)  # fmt: skip
        done = None
        if service:
            rv = self.faults.reload_return if self.faults.reload_return is not None else JOB_STARTED
            out.update(ServiceMs=t.service_ms, ServiceReturnedMs=t.service_returned_ms, ServiceReturn=rv)
            if rv == JOB_STARTED:
                done = max(t.service_returned_ms or 0.0, (t.service_ms or 0.0) + self.job_ms)
                clock.sleep_until(done)
                out.update(JobDone=True, JobState=7, JobErrorCode=0, ServiceDoneMs=done)
        if shutdown and after_ready:
            t.fire_ms, t.fire_returned_ms = clock.call_at(clock.ms(), self.shutdown_call_ms)
        delivered = None
        if shutdown and t.fire_ms is not None:
            ic_then = self._ic_at(t.fire_ms - (t.service_ms or 0.0)) if t.service_ms is not None else "OK"
            ok = ic == "OK" and ic_then == "OK"
            rv = (JOB_STARTED if self.faults.shutdown_returns_4096 else 0) if ok else INVALID_STATE
            out.update(FireMs=t.fire_ms, FireReturnedMs=t.fire_returned_ms, FireReturn=rv,
                       IcAtFire=ic if ic != "OK" else ic_then)  # fmt: skip
            if ok and not self._lost(
                v, t
            ):  # Hyper-V holds a message posted during servicing, delivers it after
                held = done is not None and t.service_ms is not None and t.fire_ms >= t.service_ms
                delivered = (max(t.fire_ms, done) if held and done is not None else t.fire_ms) + 1.0
        off = delivered + 5.0 if delivered is not None else None
        out["GraceSkipped"] = shutdown and out["FireReturn"] not in (None, 0, JOB_STARTED)
        out.update(OffMs=off, EndMs=off if off is not None else clock.ms(), Running=off is None,
                   IcAfter="" if off is not None else "OK", Com1Error="", Com3Error="")  # fmt: skip
        out["Com3"] = self._com3(t.service_ms) if com3_pipe else []
        line = "hv_utils: Shutdown request received - graceful shutdown initiated"
        out["Com1"] = [{"Ms": delivered, "Line": line}] if delivered is not None and com1_pipe else []
        v.events = []
        if off is not None:
            v.events.append({"Id": 18504, "Log": WORKER_LOG, "TimeUtc": (started + timedelta(milliseconds=off)).isoformat(),
                             "Message": f"'{v.vm_id}' was shut down using the Shutdown Integration Component"})  # fmt: skip
            v.state = "Off"
        return out

    # ---- the modeled servicing: OpenHCL's lines, the IC, the loss window ----------------------
    def _ic_at(self, since_service_ms: float) -> str:
        """The shutdown IC's state that long after the servicing call's start."""
        if not self.servicing_closes_ic:
            return "OK"
        return "No Contact" if IC_CLOSE * self.job_ms <= since_service_ms < IC_REOPEN * self.job_ms else "OK"

    def _lost(self, v: HvVm, t: _Timed) -> bool:
        """A build without the fix loses a request taken between OpenHCL's receipt of the
        servicing request and its channel's close (the #954 window)."""
        if not self.lossy_builds or t.service_ms is None or t.fire_ms is None:
            return False
        igvm = self.vm_igvm.get(v.vm_id, "")
        if not any(igvm.endswith(name) for name in self.lossy_builds):
            return False
        since = t.fire_ms - t.service_ms
        return OPENHCL_LINES[0][0] * self.job_ms <= since < IC_CLOSE * self.job_ms

    def _com3(self, service_ms: float | None) -> list[dict[str, Any]]:
        if service_ms is None:
            return []
        return [{"Ms": service_ms + f * self.job_ms, "Line": text} for f, text in OPENHCL_LINES]

    def _anchored(self, clock: _Clock, out: dict[str, Any], anchor: tuple[str, str], offset: float) -> _Timed:
        """Servicing on its own thread, the shot ``offset`` after the anchor on this one."""
        kind, pattern = anchor
        t = _Timed()
        th = _servicing_runspace(clock, t, self.service_call_ms, [clock.ms()])
        s0 = _started(t)
        out["FireAfter"] = kind
        at: float | None = None
        resolution = 0.0
        if kind == "line":
            rx = re.compile(pattern)
            at = next((s0 + f * self.job_ms for f, text in OPENHCL_LINES if rx.search(text)), None)
            if at is not None:
                clock.sleep_until(at)  # the reader thread stamps the line on arrival
        else:  # sampled back to back: the anchor is seen at the end of the sample after it happened
            prev = clock.ms()
            transitions: list[dict[str, Any]] = []
            deadline = s0 + self.job_ms * 3 + 1000
            while clock.ms() < deadline:
                clock.sleep_until(clock.ms() + CIM_SAMPLE_MS)
                now = clock.ms()
                if kind == "job-done" and now - s0 >= self.job_ms:
                    at, resolution = now, now - prev
                    break
                if kind == "ic-ready":
                    state = self._ic_at(now - s0)
                    if not transitions or transitions[-1]["State"] != state:
                        transitions.append({"Ms": now, "State": state})
                    left = any(x["State"] != "OK" for x in transitions)
                    if state == "OK" and (left or now - s0 >= self.job_ms):
                        at, resolution = now, now - prev
                        break
                prev = now
            out["IcTransitions"] = transitions
        th.join()
        if at is None:
            out["AnchorMissing"] = f"servicing was over and the {kind} anchor had not come"
            return t
        out.update(AnchorMs=at, AnchorResolutionMs=resolution, FirePlannedMs=at + offset)
        t.fire_ms, t.fire_returned_ms = clock.call_at(at + offset, self.shutdown_call_ms)
        return t


class _Clock:
    """The race's Stopwatch: ms since it started, a sleep that ends by spinning (as the
    module's waits do), and a modeled WMI call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def sleep_until(self, at_ms: float) -> None:
        """As the module waits: sleep to 20 ms before (a sleep may overshoot), then spin."""
        left = at_ms - self.ms() - 20.0
        if left > 0:
            time.sleep(left / 1000.0)
        while self.ms() < at_ms:
            pass

    def call_at(
        self, at_ms: float, call_ms: float, before: Callable[[float], None] | None = None
    ) -> tuple[float, float]:
        """A WMI call made at ``at_ms`` that takes ``call_ms`` to return: (made, returned)."""
        self.sleep_until(at_ms)
        t = self.ms()
        if before is not None:
            before(t)
        time.sleep(call_ms / 1000.0)
        return t, self.ms()


@dataclass
class _Timed:
    service_ms: float | None = None
    service_returned_ms: float | None = None
    fire_ms: float | None = None
    fire_returned_ms: float | None = None


def _timed(clock: _Clock, concurrent: bool, offset: float, service: bool, by_offset: bool, service_call_ms: float,
           shutdown_call_ms: float) -> _Timed:  # fmt: skip
    """When each call was made and returned, on ``clock``. ``concurrent`` (the module gives
    each call a thread): the call that leads is made at once, the other at the leader's
    actual time + |offset| while the leader may still be in flight. Otherwise (one thread)
    each call must return before the next wait begins, as the old module did."""
    t = _Timed()
    if not service:
        if by_offset:
            t.fire_ms, t.fire_returned_ms = clock.call_at(max(offset, 0.0), shutdown_call_ms)
        return t
    if not by_offset:
        t.service_ms, t.service_returned_ms = clock.call_at(clock.ms(), service_call_ms)
        return t
    if not concurrent:
        if offset < 0:
            t.fire_ms, t.fire_returned_ms = clock.call_at(clock.ms(), shutdown_call_ms)
            t.service_ms, t.service_returned_ms = clock.call_at(t.fire_ms - offset, service_call_ms)
        else:
            t.service_ms, t.service_returned_ms = clock.call_at(clock.ms(), service_call_ms)
            t.fire_ms, t.fire_returned_ms = clock.call_at(t.service_ms + offset, shutdown_call_ms)
        return t
    at: list[float] = []
    th = _servicing_runspace(clock, t, service_call_ms, at)
    if offset < 0:  # the shot leads; servicing starts |offset| after the shot's actual time
        t.fire_ms, t.fire_returned_ms = clock.call_at(
            clock.ms(), shutdown_call_ms, lambda fired: at.append(fired - offset)
        )
    else:
        at.append(clock.ms())
        t.fire_ms, t.fire_returned_ms = clock.call_at(_started(t) + offset, shutdown_call_ms)
    th.join()
    return t


def _servicing_runspace(clock: _Clock, t: _Timed, call_ms: float, at: list[float]) -> threading.Thread:
    """ReloadManagementVtl's runspace: spins until its start time is in ``at``, then makes
    its call, stamped in ``t`` when made (before the call, as the runspace does) and when
    it returned."""

    def made(when: float) -> None:
        t.service_ms = when

    def servicing() -> None:
        while not at:
            time.sleep(0)  # runnable all along, as the runspace's spin (a blocked thread wakes late)
        _, t.service_returned_ms = clock.call_at(at[0], call_ms, made)

    th = threading.Thread(target=servicing, daemon=True)
    th.start()
    return th


def _started(t: _Timed) -> float:
    """The servicing call's actual start, spun for as the module does."""
    while t.service_ms is None:
        time.sleep(0)
    return t.service_ms
