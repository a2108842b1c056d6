"""The local and SSH routes to a Windows host's PowerShell (item 8): a fake powershell on
this machine (and on a real sshd's PATH) that answers from an emulated host, writing its
stdout in the host's OEM code page as Windows PowerShell 5.1 does when redirected; and
the WinRM listener certificate the host playbook makes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tree_sitter as ts
import tree_sitter_powershell as tsp
from ruamel.yaml import YAML
from winrm_standin import EmulatedHost, serve_unix  # type: ignore[import-not-found]

from testbed.transport.base import TransportError
from testbed.transport.powershell import LocalPowerShell, PowerShellError, SshPowerShell

ROOT = Path(__file__).resolve().parents[2]
MODULE = r"C:\testbed\modules\Testbed-0123.psm1"
GERMAN = "Prüfpunkt „testbed-ic-ok“ für VM 'ü' wurde nicht gefunden."


def german_host(**kw: object) -> EmulatedHost:
    """A German host: OEM code page 850, localised messages in its answers and errors."""

    def fail() -> None:
        raise RuntimeError(f"Get-VMSnapshot : {GERMAN.replace('„', '').replace('“', '')}")

    return EmulatedHost(files={MODULE: b"function Get-TestbedPreflight {}\nfunction Restore-TestbedVm {}\n"}, oem_codepage=850, functions={
        "Get-TestbedPreflight": lambda: {"Edition": "Rechenzentrum", "Note": "Größe: 4 GiB"},
        "Restore-TestbedVm": fail}, **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[EmulatedHost, str]]:
    host = german_host()
    with serve_unix(host, str(tmp_path)) as bindir:
        yield host, os.path.join(bindir, "powershell")


def test_the_local_route_reads_output_in_the_hosts_oem_code_page(local: tuple[EmulatedHost, str]) -> None:
    """Windows PowerShell 5.1 writes a redirected stdout in the OEM code page (850 here):
    read as UTF-8, every umlaut of a German host's answer and error became U+FFFD."""
    host, exe = local
    p = LocalPowerShell(exe)
    assert p.invoke(MODULE, "Get-TestbedPreflight", {}) == {
        "Edition": "Rechenzentrum",
        "Note": "Größe: 4 GiB",
    }
    with pytest.raises(PowerShellError, match="Prüfpunkt testbed-ic-ok für VM 'ü' wurde nicht gefunden"):
        p.invoke(MODULE, "Restore-TestbedVm", {})
    assert (
        sum(s.strip() == "[Console]::OutputEncoding.CodePage" for s in host.scripts_seen) == 1
    )  # asked once


def test_the_local_route_streams_a_file_with_a_timeout_per_line(
    local: tuple[EmulatedHost, str], tmp_path: Path
) -> None:
    """An upload is read from the file and fed a line at a time, each line within
    chunk_timeout_s: a host that is slow but keeps taking lines is not cut off by a timeout
    for the whole command (the old route held the whole file and gave it 900 s)."""
    host, exe = local
    big = tmp_path / "vtl0.vhdx"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    p = LocalPowerShell(exe, chunk_timeout_s=5.0, timeout_s=30.0)
    assert p.upload(big, r"C:\testbed\cache\vtl0.vhdx") is True
    assert host.files[r"C:\testbed\cache\vtl0.vhdx"] == big.read_bytes()


def test_a_host_that_stops_taking_stdin_fails_after_one_line_timeout(tmp_path: Path) -> None:
    host = german_host(stdin_stall_s=30.0)
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(2 * 1024 * 1024))
    with serve_unix(host, str(tmp_path)) as bindir:
        p = LocalPowerShell(os.path.join(bindir, "powershell"), chunk_timeout_s=1.0, timeout_s=60.0)
        with pytest.raises(TransportError, match=r"the host took no stdin for 1 s \(line \d+\)"):
            p.upload(data, r"C:\testbed\cache\big.bin")


def test_the_ssh_route_streams_and_reads_the_oem_code_page(tmp_path: Path) -> None:
    """Windows OpenSSH: the same fake powershell on a real sshd's PATH."""
    from sshd import run_sshd  # type: ignore[import-not-found]

    from testbed.core.config import HostEntry
    from testbed.transport import transport_for

    host = german_host()
    big = tmp_path / "openhcl.bin"
    big.write_bytes(os.urandom(1024 * 1024 + 5))
    with (
        serve_unix(host, str(tmp_path)) as bindir,
        run_sshd(tmp_path / "sshd", env={"PATH": f"{bindir}:/usr/bin:/bin"}) as s,
    ):
        entry = HostEntry(name="hv-ssh", uri=s.uri, kind="hyperv", identity_file=str(s.key),
                          known_hosts=str(s.known_hosts))  # fmt: skip
        p = SshPowerShell(transport_for(entry), chunk_timeout_s=10.0, timeout_s=60.0)
        try:
            assert p.invoke(MODULE, "Get-TestbedPreflight", {})["Note"] == "Größe: 4 GiB"
            assert p.upload(big, r"C:\testbed\cache\openhcl.bin") is True
            assert host.files[r"C:\testbed\cache\openhcl.bin"] == big.read_bytes()
        finally:
            p.close()


def cert_script() -> str:
    plays = YAML(typ="safe").load((ROOT / "playbooks" / "hosts" / "hyperv-host.yml").read_text())
    (task,) = [
        t for t in plays[0]["tasks"] if "New-SelfSignedCertificate" in str(t.get("ansible.windows.win_shell"))
    ]
    return str(task["ansible.windows.win_shell"])


def test_the_winrm_certificate_names_the_fqdn_and_the_addresses() -> None:
    """The host playbook's listener certificate: a controller that reaches the host by its
    FQDN or an IP address must find that name in the certificate's SANs."""
    script = cert_script()
    assert not ts.Parser(ts.Language(tsp.language())).parse(script.encode()).root_node.has_error
    assert "$env:COMPUTERNAME" in script and ".DomainName" in script  # NetBIOS name and FQDN
    assert "Get-NetIPAddress" in script and "'IPAddress=' +" in script and "'DNS=' +" in script
    assert "2.5.29.17={text}" in script and "-TextExtension" in script
    assert "-DnsName $env:COMPUTERNAME" not in script
