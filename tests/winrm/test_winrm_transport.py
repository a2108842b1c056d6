"""pywinrm's real wire traffic against the WS-Man stand-in (HTTP on loopback)."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from winrm_standin import B64, EmulatedHost, StandIn, make_test_ca, ps51_json, running  # type: ignore[import-not-found]

from testbed.transport.base import TransportError
from testbed.transport.clixml import error_messages
from testbed.transport.powershell import CMD_LIMIT, PowerShellError, encoded_command
from testbed.transport.powershell import FILE_HASH as FILE_HASH_PROBE
from testbed.transport.winrm import WinRmAuthError, WinRmPowerShell

MODULE = r"C:\testbed\cache\Testbed-0123.psm1"
# The functions these tests call, declared as PowerShell binds them (the stand-in refuses an
# argument the uploaded module does not declare, as PowerShell does).
FAKE_MODULE = (
    b"function Get-TestbedPreflight { param($VmName, $Count) }\nfunction Stop-TestbedVm { param($Name) }\n"
)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    host = EmulatedHost(functions={
        "Get-TestbedPreflight": lambda **kw: {"HyperV": True, "Build": 26100, "Echo": kw},
        "Stop-TestbedVm": lambda Name: (_ for _ in ()).throw(RuntimeError(f"Hyper-V was unable to find a virtual "
                                                                          f"machine with name \"{Name}\".")),
    })  # fmt: skip
    with running(host) as s:
        yield s


def ps(s: StandIn, password: str | None = None) -> WinRmPowerShell:
    return WinRmPowerShell(s.endpoint, s.user, password or s.password, auth="basic")


def test_uploads_stream_on_stdin_under_the_command_line_limit(standin: StandIn) -> None:
    module = ("# Testbed.psm1 stand-in\n" + "function Get-TestbedX { 'x' }\n" * 2000).encode()
    assert len(encoded_command(module.decode())) > CMD_LIMIT  # too big for one command line
    p = ps(standin)
    # A script that long goes on stdin to a short fixed script (the host ran it: the stand-in
    # answers only testbed's own scripts), never onto an over-long command line.
    with pytest.raises(PowerShellError, match='unrecognised script: "# Testbed.psm1 stand-in'):
        p.run(module.decode())
    assert 0 < standin.host.max_command_seen <= CMD_LIMIT
    assert p.upload(module, MODULE) is True
    assert standin.host.files[MODULE] == module
    assert 0 < standin.host.max_command_seen <= CMD_LIMIT  # every call respected cmd.exe's limit
    assert p.upload(module, MODULE) is False  # same sha256 on the host: skipped
    sends = standin.sends
    big = os.urandom(300_000)  # an artifact: 7 lines of 48 KiB, one WS-Man Send each
    assert p.upload(big, r"C:\testbed\cache\big.bin") is True
    assert standin.host.files[r"C:\testbed\cache\big.bin"] == big
    assert standin.sends - sends == 7 and standin.host.stdin_uploads == 2
    assert p.upload(b"", r"C:\testbed\cache\empty.bin") is True  # stdin still ends: no hang
    assert standin.host.files[r"C:\testbed\cache\empty.bin"] == b""


def test_invoke_passes_parameters_as_data(standin: StandIn) -> None:
    p = ps(standin)
    p.upload(FAKE_MODULE, MODULE)
    awkward = 'it\'s "quoted"; $(Remove-Item C:\\ -Recurse) `n'
    out = p.invoke(MODULE, "Get-TestbedPreflight", {"VmName": awkward, "Count": 3})
    assert out["HyperV"] is True and out["Echo"] == {"VmName": awkward, "Count": 3}
    assert standin.host.calls[-1] == ("Get-TestbedPreflight", {"VmName": awkward, "Count": 3})
    with pytest.raises(ValueError, match="not a Testbed module function"):
        p.invoke(MODULE, "Remove-Item", {})


def test_powershell_error_records_become_typed_errors(standin: StandIn) -> None:
    p = ps(standin)
    p.upload(FAKE_MODULE, MODULE)
    with pytest.raises(PowerShellError, match='unable to find a virtual machine with name "vm1"') as e:
        p.invoke(MODULE, "Stop-TestbedVm", {"Name": "vm1"})
    assert e.value.exit_code == 1 and e.value.records


def test_401_is_an_auth_error_and_the_password_is_not_in_it(standin: StandIn) -> None:
    with pytest.raises(WinRmAuthError, match="401") as e:
        ps(standin, password="wrong horse battery").run("'x'")
    assert "wrong horse battery" not in str(e.value)
    standin.faults.unauthorized = True
    with pytest.raises(WinRmAuthError):
        ps(standin).run("'x'")


def test_malformed_clixml_is_reported_not_swallowed(standin: StandIn) -> None:
    standin.faults.malformed_clixml = True
    with pytest.raises(PowerShellError, match="malformed CLIXML"):
        ps(standin).run_json("$x = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{b64}'))",
                             {"path": "C:\\x"})  # fmt: skip


def test_dropped_connection_mid_receive_is_a_transport_error(standin: StandIn) -> None:
    p = ps(standin)
    standin.faults.drop_receive = True
    with pytest.raises(TransportError):
        p.upload(FAKE_MODULE, MODULE)


def test_clixml_parsing() -> None:
    err = (
        '#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        '<S S="Error">Stop-VM : boom_x000D__x000A_</S><S S="Error">second _x0041_ line_x000D__x000A_</S></Objs>'
    )
    assert error_messages(err) == ["Stop-VM : boom", "second A line"]
    assert error_messages("plain text\n") == ["plain text"]


def test_from_uri_needs_the_password_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TB_HV_PASS", raising=False)
    with pytest.raises(TransportError, match="TB_HV_PASS is not set"):
        WinRmPowerShell.from_uri("winrms://admin@hv1", "TB_HV_PASS")
    monkeypatch.setenv("TB_HV_PASS", "x")
    p = WinRmPowerShell.from_uri("winrms://admin@hv1", "TB_HV_PASS")
    assert p.endpoint == "https://hv1:5986/wsman" and os.environ["TB_HV_PASS"] not in p.name


def test_ntlm_with_message_encryption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NTLM over plain HTTP, as labs run it: every SOAP body is sealed (pyspnego is the acceptor)."""
    (tmp_path / "ntlm").write_text("LAB:tester:s3cret pass\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(tmp_path / "ntlm"))
    host = EmulatedHost(functions={"Get-TestbedPreflight": lambda: {"HyperV": True}})
    with running(host, auth="ntlm") as s:
        p = WinRmPowerShell(s.endpoint, r"LAB\tester", "s3cret pass", auth="ntlm")
        p.upload(FAKE_MODULE, MODULE)
        assert p.invoke(MODULE, "Get-TestbedPreflight", {}) == {"HyperV": True}
        assert s.encrypted_requests >= 7  # create once; command, receive, signal for each call: all sealed
        with pytest.raises(WinRmAuthError):
            WinRmPowerShell(s.endpoint, r"LAB\tester", "wrong", auth="ntlm").run("'x'")


def test_https_with_a_test_ca(tmp_path: Path) -> None:
    ca_file, ctx = make_test_ca(str(tmp_path))
    host = EmulatedHost(functions={"Get-TestbedPreflight": lambda: {"HyperV": True}})
    with running(host, tls=ctx) as s:
        assert s.endpoint.startswith("https://")
        good = WinRmPowerShell(s.endpoint, s.user, s.password, auth="basic", ca_bundle=ca_file)
        good.upload(FAKE_MODULE, MODULE)
        assert good.invoke(MODULE, "Get-TestbedPreflight", {}) == {"HyperV": True}
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            WinRmPowerShell(s.endpoint, s.user, s.password, auth="basic").run("'x'")  # system CAs: refused
        insecure = WinRmPowerShell(s.endpoint, s.user, s.password, auth="basic", verify_tls=False)
        assert insecure.run_json(FILE_HASH_PROBE, {"path": MODULE}) == {
            "sha256": hashlib.sha256(FAKE_MODULE).hexdigest()
        }


def test_powershell_5_1_json_shapes() -> None:
    import datetime as dt

    assert ps51_json([{"Id": 18504}]) == '{"Id":18504}'  # one-element arrays come out unwrapped
    stamp = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    ms = int(stamp.timestamp() * 1000)
    assert ps51_json({"T": stamp}) == '{"T":"\\/Date(' + str(ms) + ')\\/"}'


def test_an_unexpected_answer_is_a_typed_error_naming_the_function(standin: StandIn) -> None:
    from testbed.backends.hyperv.module import HostModule, HostModuleError

    standin.host.functions["Get-TestbedPreflight"] = lambda: {"Build": "not a number", "HyperV": True}
    with pytest.raises(HostModuleError, match="Get-TestbedPreflight failed on .*unexpected answer") as e:
        HostModule(ps(standin)).preflight()
    assert e.value.function == "Get-TestbedPreflight"


def test_connection_setup_is_retried_and_logged_but_a_command_is_not(
    standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    caplog.set_level("WARNING")
    with pytest.raises(TransportError, match="ConnectionError"):
        WinRmPowerShell(f"http://127.0.0.1:{port}/wsman", "u", "p", auth="basic").run("'x'")
    assert len([r for r in caplog.records if "Retrying" in r.getMessage()]) == 2  # 3 attempts in all
    caplog.clear()
    standin.faults.drop_on = "Get-TestbedPreflight"
    p = ps(standin)
    p.upload(FAKE_MODULE, MODULE)
    commands = standin.requests.count("command")
    with pytest.raises(TransportError):
        p.invoke(MODULE, "Get-TestbedPreflight", {})
    assert standin.requests.count("command") == commands + 1  # sent once, not again


def test_one_warm_shell_per_connection(standin: StandIn) -> None:
    """The shell is created once and deleted at close: a call without stdin costs three
    exchanges (command, receive, signal), not five."""
    p = ps(standin)
    p.upload(FAKE_MODULE, MODULE)
    before = len(standin.requests)
    for _ in range(4):
        p.invoke(MODULE, "Get-TestbedPreflight", {})
    assert standin.requests[before:] == ["command", "receive", "signal"] * 4
    assert standin.requests.count("create") == 1
    p.close()
    assert standin.requests[-1] == "delete" and standin.shells == set()


def test_a_shell_the_host_dropped_is_reopened_before_the_command_runs(
    standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle timeout or a WinRM restart on the host: the command is refused before it
    starts (invalid selectors), so a new shell is opened and the command runs once."""
    p = ps(standin)
    p.upload(FAKE_MODULE, MODULE)
    standin.shells.clear()  # the host forgot the shell
    caplog.set_level("WARNING")
    calls = len(standin.host.calls)
    assert p.invoke(MODULE, "Get-TestbedPreflight", {})["HyperV"] is True
    assert len(standin.host.calls) == calls + 1  # ran exactly once
    assert [r.getMessage() for r in caplog.records if "dropped the WinRM shell" in r.getMessage()]
    assert standin.requests.count("create") == 2


# ---- pywinrm's floor (item 2) ---------------------------------------------------------------
# From pywinrm's CHANGELOG.md (diyan/pywinrm, commit e8bb574, "Add WSManFaultError (#382)"):
# "### Version 0.5.0 ... Added `WSManFaultError` which contains WSManFault specific information
# when receiving a 500 WSMan fault response" (its wsman_fault_code among them); v0.4.3's
# winrm/exceptions.py has no WSManFault at all.
NAMES_SINCE = {"0.5.0": ("winrm.exceptions.WSManFaultError", "WSManFaultError.wsman_fault_code")}


def test_the_pywinrm_floor_has_the_names_the_transport_uses() -> None:
    import inspect
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version
    from winrm.exceptions import WSManFaultError

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "pywinrm"]
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("0.5.0"), (
        f"pyproject allows {req}: WSManFaultError is from 0.5.0"
    )
    source = (root / "testbed" / "transport" / "winrm.py").read_text()
    assert (
        re.search(r"from winrm\.exceptions import .*WSManFaultError", source) and "wsman_fault_code" in source
    )
    assert "wsman_fault_code" in inspect.signature(WSManFaultError.__init__).parameters


# ---- console-mode stdin (item 3) --------------------------------------------------------------
def test_streamed_stdin_is_sent_with_console_mode_off(standin: StandIn) -> None:
    """pywinrm's run_command defaults to WINRS_CONSOLEMODE_STDIN=TRUE: the stdin then goes
    to the process's console, and powershell.exe's $input stays empty (the stand-in does as
    Windows does). A command whose stdin is streamed must say FALSE, as Ansible's put_file
    does; a command without stdin keeps the default."""
    p = ps(standin)
    data = os.urandom(100_000)
    assert p.upload(data, r"C:\testbed\cache\x.bin") is True
    assert standin.host.files[r"C:\testbed\cache\x.bin"] == data
    modes = list(standin.console_mode.values())
    assert modes == [True, False], modes  # the hash probe (no stdin), then the upload


# ---- over-long command lines (item 4) -----------------------------------------------------------
# What a CI runner's VM names and cached artifacts look like (a VM name is the vm_config's
# name, the controller's host name, its pid and a stamp).
RUNNER = "ci-hyperv-runner-0042.lab.example.com"
VM_NAME = f"hyperv-openhcl-{RUNNER}-123456-12345678"
SHA = "9f2c" * 16


def new_vm_args(host_dir: str, cmdline: str) -> dict[str, Any]:
    return {"name": VM_NAME, "igvm_path": rf"{host_dir}\cache\{SHA}\openhcl-x64.bin",
            "vhd_path": rf"{host_dir}\cache\{SHA}\ubuntu-24.04-vtl0.vhdx", "vm_dir": rf"{host_dir}\vms\{VM_NAME}",
            "owner": f"{RUNNER}:123456:1700000000", "memory_mb": 2048, "processors": 2, "firmware_cmdline": cmdline,
            "com1_pipe": f"{VM_NAME}-com1", "com3_pipe": f"{VM_NAME}-com3"}  # fmt: skip


def test_a_long_call_travels_on_stdin_not_the_command_line(standin: StandIn) -> None:
    """A New-TestbedVm call with a 1,300-character firmware command line is ~8,800
    characters as -EncodedCommand: over cmd.exe's 8191 (the stand-in refuses it as Windows
    does). It goes on stdin to a short fixed script instead; never an uncaught ValueError."""
    from testbed.backends.hyperv.module import HostModule

    seen: dict[str, Any] = {}
    standin.host.functions["New-TestbedVm"] = lambda **kw: (
        seen.update(kw) or {"Name": kw["Name"], "VmId": "1" * 32}
    )
    cmdline = " ".join(f"OPENHCL_OPT_{i}=value{i}" for i in range(60))[:1300]
    assert len(cmdline) == 1300
    m = HostModule(ps(standin))
    vm = m.new_vm(**new_vm_args(r"C:\testbed", cmdline))
    assert vm.vm_id == "1" * 32 and seen["FirmwareCommandLine"] == cmdline
    assert 0 < standin.host.max_command_seen <= CMD_LIMIT


def test_a_nested_call_too_long_for_l0s_command_line_travels_on_stdin(standin: StandIn) -> None:
    """Nested: the L1 call is wrapped for PowerShell Direct (base64 inside base64), so a
    400-character firmware command line already makes ~8,900 characters on L0 (~7,000
    with none); it goes on stdin, after which the L1 password still arrives as the
    inner script's first line."""
    from testbed.backends.hyperv.module import HostModule
    from testbed.transport.powershell import PowerShellDirect

    l1 = EmulatedHost(functions={"New-TestbedVm": lambda **kw: {"Name": kw["Name"], "VmId": "2" * 32,
                                                                "Cmdline": kw["FirmwareCommandLine"]}})  # fmt: skip
    l1_name = f"testbed-l1-{RUNNER}-123456"
    standin.host.vms[l1_name] = ("Administrator", "l1 pass", l1)
    direct = PowerShellDirect(ps(standin), l1_name, "Administrator", "l1 pass", r"C:\testbed\staging")
    cmdline = ("OPENHCL_TEST_CONFIG=SERVICING_SAVE_STUCK " * 12)[:400]
    m = HostModule(direct, r"C:\testbed")
    vm = m.new_vm(**new_vm_args(r"C:\testbed", cmdline))
    assert vm.vm_id == "2" * 32 and vm.model_extra == {"Cmdline": cmdline}
    assert 0 < standin.host.max_command_seen <= CMD_LIMIT
    assert not any(
        b"l1 pass" in base64.b64decode(x) for s in standin.host.scripts_seen for x in B64.findall(s)
    )
