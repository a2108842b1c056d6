"""The hyperv backend kind: how testbed finds and opens it (entry point ``testbed.backends``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from testbed.backends.hyperv.capabilities import CAPABILITIES
from testbed.backends.hyperv.config import HyperVVmConfig
from testbed.backends.registry import BackendKind
from testbed.core.config import HostEntry, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend
    from testbed.transport.powershell import PowerShellRunner

DEFAULT_WINRM_PASSWORD_ENV = "TESTBED_WINRM_PASSWORD"


class HyperVHostEntry(HostEntry):
    """A Hyper-V host's inventory entry: how WinRM authenticates and trusts it."""

    winrm_auth: Literal["ntlm", "kerberos", "credssp", "basic"] = "ntlm"
    verify_tls: bool = Field(True, description="WinRM over HTTPS: validate the host's certificate")
    ca_bundle: str | None = Field(None, description="CA file that signed the host's WinRM certificate")


def powershell_for(entry: HostEntry, opts: HostOptions | None = None) -> PowerShellRunner:
    """The route to a Windows host's PowerShell, chosen by the URI: ``winrm(s)://``,
    ``ssh://`` (Windows OpenSSH), or ``local`` (testbed runs on the Windows host)."""
    from testbed.transport import transport_for

    opts = opts or HostOptions()
    from testbed.transport.powershell import LocalPowerShell, SshPowerShell
    from testbed.transport.winrm import WinRmPowerShell

    if entry.uri.startswith(("winrm://", "winrms://")):
        win = entry if isinstance(entry, HyperVHostEntry) else HyperVHostEntry(**entry.model_dump())
        return WinRmPowerShell.from_uri(
            entry.uri,
            entry.password_env or DEFAULT_WINRM_PASSWORD_ENV,
            auth=win.winrm_auth,
            verify_tls=win.verify_tls,
            ca_bundle=win.ca_bundle,
        )
    if entry.uri.startswith("ssh://"):
        return SshPowerShell(transport_for(entry, opts))
    return LocalPowerShell()


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.hyperv.backend import HyperVBackend

    return HyperVBackend(powershell_for(entry, opts))


KIND = BackendKind(
    capabilities=CAPABILITIES,
    typical_iteration_s=40.0,
    kind="hyperv",
    description="a Hyper-V host (WinRM)",
    vm_config=HyperVVmConfig,
    open=open_backend,
    schemes=("local", "ssh", "winrm", "winrms"),
    claims=("winrm", "winrms"),
    host_playbook="hyperv-host.yml",
    host_os="windows",
    labels={"nested": "a nested Hyper-V host"},
    host_entry=HyperVHostEntry,
)
