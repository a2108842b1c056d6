"""Testbed.psm1 parsed with a real PowerShell grammar (tree-sitter-powershell): it parses
cleanly, calls only cmdlets that exist on a Hyper-V host or functions it defines, exports
what it defines, and stays Windows PowerShell 5.1 compatible (the default WinRM endpoint)."""

from __future__ import annotations

import re
from importlib import resources

import tree_sitter as ts
import tree_sitter_powershell as tsp

from testbed.transport.winrm import FUNCTION

SOURCE = (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_bytes()
KNOWN_CMDLETS = {
    # Hyper-V module
    "New-VM", "Set-VM", "Get-VM", "Start-VM", "Stop-VM", "Remove-VM", "Set-VMFirmware", "Set-VMComPort",
    "Get-VMIntegrationService",
    # CIM, events, features
    "Get-CimInstance", "Get-CimAssociatedInstance", "Invoke-CimMethod", "Get-WinEvent",
    "Get-WindowsOptionalFeature", "Get-WindowsFeature",
    # core
    "Set-StrictMode", "Get-ItemProperty", "Where-Object", "ForEach-Object", "Start-Sleep", "Export-ModuleMember",
}  # fmt: skip


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


def test_calls_only_known_cmdlets_and_own_functions() -> None:
    defined = defined_functions()
    called = {
        SOURCE[n.start_byte : n.end_byte].decode() for n in walk(tree().root_node) if n.type == "command_name"
    }
    unknown = called - defined - KNOWN_CMDLETS
    assert not unknown, f"cmdlets the module does not know: {unknown}"


def test_exports_every_public_function_with_a_callable_name() -> None:
    text = SOURCE.decode()
    exported = set(re.findall(r"'([A-Z][a-z]+-Testbed\w+)'", text[text.index("$public = @(") :]))
    assert exported <= defined_functions()
    assert {"Invoke-TestbedRace", "Get-TestbedPreflight", "New-TestbedVm", "Remove-TestbedVm"} <= exported
    assert all(FUNCTION.match(f) for f in exported)  # the transport will call them


def test_windows_powershell_5_1_compatible() -> None:
    code = "\n".join(ln.split("#", 1)[0] for ln in SOURCE.decode().splitlines())
    assert "??" not in code, "null-coalescing is PowerShell 7"
    assert not re.search(r"\)\s*&&|\)\s*\|\|", code), "pipeline chain operators are PowerShell 7"
    assert not re.search(r"\$\w+\s*\?\s*[^:]+:", code), "the ternary operator is PowerShell 7"
    assert "-Parallel" not in code and "Start-Job" not in code  # Start-Job would start a new powershell.exe


def test_options_bits_are_the_documented_values() -> None:
    from testbed.backends.hyperv import options

    assert options(override_version_checks=True) == 0x1
    assert options(disable_nvme_keepalive=True) == 0x10
    assert options(override_version_checks=True, disable_nvme_keepalive=True) == 17  # petri ORs 1 and 16
