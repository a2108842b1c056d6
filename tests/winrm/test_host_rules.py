"""The emulated Windows host refuses what a real one refuses (issue: Hyper-V on a real
host). Each rule has a test that fails on the old code: a script PowerShell cannot
parse, Import-Module under a client SKU's Restricted policy, an Add-Type that misses
System.Core, COM3 on a build without the additional-COM-ports code path."""

from __future__ import annotations

import base64
import json
from importlib import resources

import pytest
import tree_sitter as ts
import tree_sitter_powershell as tsp
from winrm_standin import EmulatedHost, add_type_problems, parse_errors, running  # type: ignore[import-not-found]

from testbed.transport import powershell
from testbed.transport.winrm import WinRmPowerShell

MODULE = r"C:\testbed\cache\Testbed-0123.psm1"
SOURCE = (resources.files("testbed.backends.hyperv") / "Testbed.psm1").read_text()
# What FILE_HASH was before: an `if` statement piped into ConvertTo-Json.
OLD_FILE_HASH = powershell._ARGS + (
    "if (Test-Path $a.path) {{ @{{ sha256 = (Get-FileHash -Algorithm SHA256 -Path $a.path).Hash.ToLower() }} }}"
    " else {{ @{{ sha256 = '' }} }} | ConvertTo-Json -Compress\n"
)


def fixed_scripts() -> dict[str, str]:
    """Every PowerShell text testbed can send, formatted as it is sent."""
    b64 = base64.b64encode(json.dumps({"path": "C:\\x"}).encode()).decode()
    return {name: value.format(b64=b64) for name, value in vars(powershell).items()
            if isinstance(value, str) and name.isupper() and "{b64}" in value}  # fmt: skip


def test_every_fixed_script_and_the_module_parse() -> None:
    scripts = fixed_scripts()
    assert {"FILE_HASH", "CALL", "STREAM_UPLOAD", "IN_VM", "COPY_TO_VM"} <= set(scripts)
    parser = ts.Parser(ts.Language(tsp.language()))
    bad = [
        n
        for n, s in {**scripts, "Testbed.psm1": SOURCE}.items()
        if parser.parse(s.encode()).root_node.has_error
    ]
    assert bad == []


def test_a_script_that_does_not_parse_is_refused_as_a_host_would() -> None:
    host = EmulatedHost()
    assert parse_errors(OLD_FILE_HASH.format(b64="AAAA"))  # "An empty pipe element is not allowed"
    rc, _out, err = host.powershell(
        OLD_FILE_HASH.format(b64=base64.b64encode(b'{"path": "C:\\\\x"}').decode())
    )
    assert rc == 1 and "ParserError" in err
    rc, out, _err = host.powershell(
        powershell.FILE_HASH.format(b64=base64.b64encode(b'{"path": "C:\\\\x"}').decode())
    )
    assert rc == 0 and json.loads(out) == {"sha256": ""}


def call_script() -> str:
    b64 = base64.b64encode(
        json.dumps({"module": MODULE, "function": "Get-TestbedX", "params": {}}).encode()
    ).decode()
    return powershell.CALL.format(b64=b64)


def test_restricted_policy_refuses_the_module_unless_bypassed() -> None:
    host = EmulatedHost(files={MODULE: b"function Get-TestbedX {}"}, functions={"Get-TestbedX": lambda: {"ok": True}},
                        execution_policy="Restricted")  # fmt: skip
    lines = call_script().splitlines(keepends=True)
    old_call = "".join(ln for ln in lines if "ExecutionPolicy" not in ln)  # no process scope set
    assert len(lines) - len(old_call.splitlines()) == 2
    rc, _out, err = host.powershell(old_call)  # the old script, and no -ExecutionPolicy: a Windows 11 client
    assert rc == 1 and "running scripts is disabled on this system" in err
    assert host.powershell(old_call, policy="Bypass")[0] == 0  # powershell.exe -ExecutionPolicy Bypass
    assert host.powershell(call_script())[0] == 0  # the process scope, set by the script itself (nested L1)
    assert "-ExecutionPolicy" in powershell.encoded_argv("x") and "Bypass" in powershell.encoded_argv("x")


def test_restricted_host_over_real_winrm(monkeypatch: pytest.MonkeyPatch) -> None:
    host = EmulatedHost(files={MODULE: b"function Get-TestbedX {}"}, functions={"Get-TestbedX": lambda: {"ok": True}},
                        execution_policy="Restricted")  # fmt: skip
    with running(host) as s:
        p = WinRmPowerShell(s.endpoint, s.user, s.password, auth="basic")
        assert p.invoke(MODULE, "Get-TestbedX", {}) == {"ok": True}
        p.close()


def test_add_type_needs_system_core_for_named_pipes() -> None:
    old = SOURCE.replace(
        "Add-Type -ReferencedAssemblies System.Core -TypeDefinition", "Add-Type -TypeDefinition"
    )
    assert old != SOURCE
    problems = add_type_problems(old)
    assert len(problems) == 1 and "'Pipes' does not exist in the namespace 'System.IO'" in problems[0]
    assert add_type_problems(SOURCE) == []


def test_the_race_with_a_serial_pipe_compiles_the_module_add_type() -> None:
    old = SOURCE.replace(
        "Add-Type -ReferencedAssemblies System.Core -TypeDefinition", "Add-Type -TypeDefinition"
    )
    host = EmulatedHost(
        files={MODULE: old.encode()}, functions={"Invoke-TestbedRace": lambda **kw: {"ok": 1}}
    )
    b64 = base64.b64encode(json.dumps({"module": MODULE, "function": "Invoke-TestbedRace",
                                       "params": {"Com1Pipe": "vm-com1"}}).encode()).decode()  # fmt: skip
    rc, _out, err = host.powershell(powershell.CALL.format(b64=b64))
    assert rc == 1 and "CS0234" in err
    host.files[MODULE] = SOURCE.encode()
    assert host.powershell(powershell.CALL.format(b64=b64))[0] == 0


def test_a_group_policy_execution_policy_is_tolerated_and_nothing_else() -> None:
    """Item 7: with an execution policy set by Group Policy, ``Set-ExecutionPolicy -Scope
    Process`` writes the ExecutionPolicyOverride error record (the GPO's policy stays the
    effective one), and every error record fails a call. That one record is expected; a
    GPO of RemoteSigned still loads the local module. Any other record still fails."""
    from winrm_standin import POLICY_OVERRIDE_ID  # type: ignore[import-not-found]

    host = EmulatedHost(files={MODULE: b"function Get-TestbedX {}"}, functions={"Get-TestbedX": lambda: {"ok": True}},
                        execution_policy="RemoteSigned", gpo_policy="RemoteSigned")  # fmt: skip
    with running(host) as s:
        p = WinRmPowerShell(s.endpoint, s.user, s.password, auth="basic")
        assert p.invoke(MODULE, "Get-TestbedX", {}) == {"ok": True}
        # Nothing else is swallowed: another failure of Set-ExecutionPolicy still fails the call.
        host.set_policy_error = ("System.UnauthorizedAccessException,Microsoft.PowerShell.Commands."
                                 "SetExecutionPolicyCommand", "Set-ExecutionPolicy : Access to the registry key is "
                                 "denied.")  # fmt: skip
        with pytest.raises(powershell.PowerShellError, match="Access to the registry key is denied"):
            p.invoke(MODULE, "Get-TestbedX", {})
        # A GPO that forbids scripts wins over Bypass: refused, with the host's words.
        host.set_policy_error, host.gpo_policy = None, "AllSigned"
        with pytest.raises(powershell.PowerShellError, match="running scripts is disabled"):
            p.invoke(MODULE, "Get-TestbedX", {})
        p.close()
    # The check can fail: a script that sets the process scope without expecting the record.
    host.gpo_policy = "RemoteSigned"
    lines = call_script().splitlines(keepends=True)
    plain = [ln for ln in lines if "ExecutionPolicy" not in ln]
    plain.insert(2, "Set-ExecutionPolicy -Scope Process -ExecutionPolicy Bypass -Force\n")
    rc, _out, err = host.powershell("".join(plain), policy="Bypass")
    assert "overridden by a policy defined at a more specific scope" in err
    assert POLICY_OVERRIDE_ID.startswith("ExecutionPolicyOverride,")


def test_the_stdin_script_and_the_codepage_probe_parse() -> None:
    """The fixed scripts without a {b64} parameter parse too."""
    parser = ts.Parser(ts.Language(tsp.language()))
    for script in (powershell.STDIN_SCRIPT, powershell.CODEPAGE_PROBE, powershell.READY_PROBE):
        assert not parser.parse(script.encode()).root_node.has_error, script
