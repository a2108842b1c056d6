"""Testbed.psm1 parsed with a real PowerShell grammar (tree-sitter-powershell): it parses
cleanly, calls only cmdlets that exist on a Hyper-V host or functions it defines, exports
what it defines, and stays Windows PowerShell 5.1 compatible (the default WinRM endpoint)."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import tree_sitter as ts
import tree_sitter_powershell as tsp

from testbed.transport.powershell import FUNCTION

SOURCE = (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_bytes()
# Every cmdlet the module may call, with the parameters it may pass (from each cmdlet's
# documented syntax; Windows PowerShell 5.1 plus the Hyper-V module of build 26100+).
KNOWN_CMDLETS: dict[str, set[str]] = {
    # Hyper-V module
    "New-VM": {"Name", "Generation", "MemoryStartupBytes", "VHDPath", "Path", "GuestStateIsolationType"},
    "Set-VM": {
        "VM",
        "ProcessorCount",
        "Notes",
        "AutomaticCheckpointsEnabled",
        "StaticMemory",
        "CheckpointType",
    },
    "Checkpoint-VM": {"VM", "SnapshotName"},
    "Get-VMSnapshot": {"VM", "Name"},
    "Restore-VMSnapshot": {"VMSnapshot", "Confirm"},
    "Get-VM": {"Id", "ErrorAction"},
    "Start-VM": {"VM"},
    "Stop-VM": {"VM", "TurnOff", "Force"},
    "Remove-VM": {"VM", "Force"},
    "Set-VMFirmware": {"VM", "EnableSecureBoot"},
    "Set-VMComPort": {"VM", "Number", "Path"},
    "Set-VMProcessor": {"VM", "ExposeVirtualizationExtensions"},
    "New-VHD": {"Path", "ParentPath", "Differencing"},
    # CIM, events, features
    "Get-CimInstance": {"Namespace", "ClassName", "Filter", "InputObject"},
    "Get-CimAssociatedInstance": {"InputObject", "ResultClassName"},
    "Invoke-CimMethod": {"InputObject", "MethodName", "Arguments"},
    "Get-WinEvent": {"FilterHashtable", "ErrorAction"},
    "Get-WindowsOptionalFeature": {"Online", "FeatureName"},
    "Get-WindowsFeature": {"Name"},
    # core
    "Set-StrictMode": {"Version"},
    "Get-ItemProperty": {"Path", "Name", "ErrorAction"},
    "Where-Object": set(),
    "ForEach-Object": set(),
    "Start-Sleep": {"Milliseconds", "Seconds"},
    "Export-ModuleMember": {"Function"},
    "Add-Type": {"TypeDefinition", "ReferencedAssemblies"},
    "Join-Path": set(),
    "Split-Path": {"Leaf", "Parent"},
    "Test-Path": {"LiteralPath"},
    "New-Item": {"ItemType", "Path"},
    "Remove-Item": {"Force", "Recurse"},
    "Get-FileHash": {"Algorithm", "Path", "LiteralPath"},
    "Invoke-WebRequest": {"UseBasicParsing", "Uri", "OutFile"},
    "Copy-Item": {"Path", "LiteralPath", "Destination", "Force"},
    "Move-Item": {"Force"},
    "New-Object": set(),
    "icacls.exe": set(),  # native: its switches (/grant) are arguments, not PowerShell parameters
}


def tree() -> ts.Tree:
    return ts.Parser(ts.Language(tsp.language())).parse(SOURCE)


def walk(node: ts.Node):  # type: ignore[no-untyped-def]
    yield node
    for c in node.children:
        yield from walk(c)


def test_module_parses_cleanly() -> None:
    root = tree().root_node
    errors = [n for n in walk(root) if n.type == "ERROR" or n.is_missing]
    assert not errors, [(e.start_point, SOURCE[e.start_byte : e.end_byte][:80]) for e in errors]


def defined_functions() -> set[str]:
    return {
        SOURCE[n.start_byte : n.end_byte].decode()
        for n in walk(tree().root_node)
        if n.type == "function_name"
    }


def text(n: ts.Node) -> str:
    return SOURCE[n.start_byte : n.end_byte].decode()


def declared_parameters() -> dict[str, set[str]]:
    """The module's own functions and the parameters their param blocks declare."""
    out = {}
    for fn in walk(tree().root_node):
        if fn.type == "function_statement":
            name = next(text(c) for c in fn.children if c.type == "function_name")
            params = {
                text(v).lstrip("$")
                for sp in walk(fn)
                if sp.type == "script_parameter"
                for v in sp.children
                if v.type == "variable"
            }
            out[name] = params
    return out


def test_calls_only_known_cmdlets_with_known_parameters() -> None:
    known = {**KNOWN_CMDLETS, **declared_parameters()}
    problems = []
    for cmd in walk(tree().root_node):
        if cmd.type != "command":
            continue
        name = next((text(c) for c in cmd.children if c.type == "command_name"), None)
        if name is None:
            continue
        if name not in known:
            problems.append(f"line {cmd.start_point[0] + 1}: unknown command {name}")
            continue
        elements = next((c for c in cmd.children if c.type == "command_elements"), None)
        for p in elements.children if elements is not None else []:
            if p.type == "command_parameter" and text(p).lstrip("-").rstrip(":") not in known[name]:
                problems.append(f"line {p.start_point[0] + 1}: {name} has no parameter {text(p)}")
    assert not problems, problems


def test_a_misspelt_parameter_would_be_caught() -> None:
    """The check above can fail: a module with a wrong parameter is reported."""
    global SOURCE
    saved = SOURCE
    SOURCE = saved.replace(b"Stop-VM -VM $vm -TurnOff -Force", b"Stop-VM -VM $vm -TurnOf -Force", 1)
    try:
        with pytest.raises(AssertionError, match="Stop-VM has no parameter -TurnOf"):
            test_calls_only_known_cmdlets_with_known_parameters()
    finally:
        SOURCE = saved


def test_exports_every_public_function_with_a_callable_name() -> None:
    text = SOURCE.decode()
    exported = set(re.findall(r"'([A-Z][a-z]+-Testbed\w+)'", text[text.index("$public = @(") :]))
    assert exported <= defined_functions()
    assert {"Invoke-TestbedRace", "Get-TestbedPreflight", "New-TestbedVm", "Remove-TestbedVm"} <= exported
    assert all(FUNCTION.match(f) for f in exported)  # the transport will call them


def code_lines() -> str:
    return "\n".join(ln.split("#", 1)[0] for ln in SOURCE.decode().splitlines())


def localised_reads(code: str) -> list[str]:
    """What would break on a non-English host: the IC cmdlet (its -Name is localised),
    its status texts, or a match on the display name of an integration service."""
    found = [
        w for w in ("Get-VMIntegrationService", "PrimaryStatusDescription", "StatusDescriptions") if w in code
    ]
    found += re.findall(r"-Name\s+'?(?:Shutdown|Heartbeat)'?\b", code)
    return found


def test_reads_integration_components_by_code_not_by_localised_text() -> None:
    assert localised_reads(code_lines()) == []
    assert "Msvm_ShutdownComponent" in code_lines() and "Msvm_HeartbeatComponent" in code_lines()
    # The check can fail: the old way of reading the shutdown IC is caught.
    old = "[string](Get-VMIntegrationService -VM $hvVm -Name Shutdown).PrimaryStatusDescription"
    assert localised_reads(old) == ["Get-VMIntegrationService", "PrimaryStatusDescription", "-Name Shutdown"]


def test_windows_powershell_5_1_compatible() -> None:
    code = code_lines()
    assert "??" not in code, "null-coalescing is PowerShell 7"
    assert not re.search(r"\)\s*&&|\)\s*\|\|", code), "pipeline chain operators are PowerShell 7"
    assert not re.search(r"\$\w+\s*\?\s*[^:]+:", code), "the ternary operator is PowerShell 7"
    assert "-Parallel" not in code and "Start-Job" not in code  # Start-Job would start a new powershell.exe


def test_options_bits_are_the_documented_values() -> None:
    from testbed.backends.hyperv import options

    assert options(override_version_checks=True) == 0x1
    assert options(disable_nvme_keepalive=True) == 0x10
    assert options(override_version_checks=True, disable_nvme_keepalive=True) == 17  # petri ORs 1 and 16


def pipe_reader_problems(source: str) -> list[str]:
    """The COM1/COM3 reader must connect again while the pipe is not there yet or went
    away (the VM's worker creates the pipe at start and drops it at power off; petri's
    reader reconnects until the VM is gone): Connect sits inside the read loop, and a
    failure is caught and waited out, not the end of the reader."""
    body = source[source.index("public class PipeTail") :]
    read = body[body.index("private void Read()") :]
    loop = read[: read.index("public object[] Lines()")]
    problems = []
    if not re.search(r"while \(!closed\) \{\s*try \{[^}]*\.Connect\(", loop):
        problems.append("PipeTail connects once, outside its read loop")
    if "catch (Exception" not in loop or "Thread.Sleep" not in loop:
        problems.append("PipeTail gives up on a failed connect")
    return problems


def test_serial_reader_reconnects_until_closed() -> None:
    src = SOURCE.decode()
    assert pipe_reader_problems(src) == []
    once = src.replace(
        "            while (!closed) {\n                try {\n", "            {\n                try {\n", 1
    )
    assert once != src and pipe_reader_problems(once) == ["PipeTail connects once, outside its read loop"]


def test_event_properties_are_read_element_by_element() -> None:
    """Under Set-StrictMode -Version 3, ``$_.Properties.Value`` (member enumeration) on an
    event whose Properties list is empty throws and fails the whole events call."""
    code = code_lines()
    assert "Set-StrictMode -Version 3.0" in code
    assert not re.search(r"\.Properties\.Value\b", code)
    assert "$_.Properties | ForEach-Object { [string]$_.Value }" in code


# ---- what the race, the shutdown, the IGVM and COM3 code does (tree-sitter facts) ------------
# The emulated host answers the module's functions itself, so these facts are read from the
# module's text (tests/hyperv_emulator.py::psm1_facts, which the emulated host uses too).
# Each check is also shown failing on a module written the old way.

OLD_RACE = """
function Invoke-TestbedRace {
    param([string]$VmId, [double]$OffsetMs = 0)
    $clock = [Diagnostics.Stopwatch]::StartNew()
    $fire = {
        $t = $clock.Elapsed.TotalMilliseconds
        $r = Invoke-CimMethod -InputObject $shutdownIc -MethodName InitiateShutdown -Arguments @{ Force = $false; Reason = 'testbed' }
        if ($r.ReturnValue -eq 4096) { $script:FireJob = $r.Job }
    }
    $r = Invoke-CimMethod -InputObject $guestSvc -MethodName ReloadManagementVtl -Arguments @{ VmId = $VmId }
    while ($clock.Elapsed.TotalMilliseconds -lt $OffsetMs) { }
    & $fire
}
"""


def test_the_race_starts_the_servicing_call_on_its_own_runspace_before_firing() -> None:
    """Item 1: ReloadManagementVtl is made by a runspace script (its own thread), started
    (BeginInvoke) before the shot is fired on the race's thread and not waited for
    (EndInvoke) until after it, so a shot at a small offset lands while the call is in
    flight. The old race called it synchronously, then waited for the offset."""
    from hyperv_emulator import race_concurrent  # type: ignore[import-not-found]

    assert race_concurrent(SOURCE.decode())
    assert not race_concurrent(OLD_RACE)
    # Waiting for the runspace before firing would serialise them again: caught too.
    serial = SOURCE.decode().replace(
        "# The timed section: the shot, on this thread; servicing, on the runspace's.",
        "$null = $servicing.PowerShell.EndInvoke($servicing.Handle)",
        1,
    )
    assert serial != SOURCE.decode() and not race_concurrent(serial)


def test_initiate_shutdown_is_not_read_for_a_job_it_does_not_have() -> None:
    """Item 5: InitiateShutdown(Force, Reason) has no Job out parameter; ``$r.Job`` on its
    result throws under Set-StrictMode -Version 3 when it returns 4096."""
    from hyperv_emulator import reads_shutdown_job  # type: ignore[import-not-found]

    assert "Set-StrictMode -Version 3.0" in SOURCE.decode()
    assert not reads_shutdown_job(SOURCE.decode())
    assert reads_shutdown_job(OLD_RACE)


OLD_GRANT = """
function New-TestbedVm {
    param([string]$IgvmPath, [string]$VmDir)
    $account = 'NT VIRTUAL MACHINE\\' + $id + ':R'
    $null = & icacls.exe $IgvmPath /grant $account
}
"""


def test_the_vm_is_granted_on_its_own_copy_of_the_igvm() -> None:
    """Item 6: icacls grants each VM on a copy of the IGVM in the VM's folder (removed with
    it, as petri copies the IGVM per VM), never on the shared cached file."""
    from hyperv_emulator import igvm_acl_per_vm  # type: ignore[import-not-found]

    assert igvm_acl_per_vm(SOURCE.decode())
    assert not igvm_acl_per_vm(OLD_GRANT)


def test_com3_is_set_through_wmi_not_set_vmcomport() -> None:
    """Item 9: Set-VMComPort documents -Number 1 and 2; COM3 is the VM's third
    Msvm_SerialPortSettingData, set through ModifyResourceSettings (petri's way), after
    counting that the host offers it."""
    from hyperv_emulator import com3_by_wmi  # type: ignore[import-not-found]

    code = code_lines()
    assert com3_by_wmi(SOURCE.decode())
    assert not re.search(r"Set-VMComPort\b[^\n]*-Number\s+3", code)
    assert "ModifyResourceSettings" in code and ".Count -lt 3" in code
    assert not com3_by_wmi(SOURCE.decode() + '\nSet-VMComPort -VM $vm -Number 3 -Path "\\\\.\\pipe\\x"\n')
