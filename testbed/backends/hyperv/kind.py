"""The hyperv backend kind: how testbed finds and opens it (entry point ``testbed.backends``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.backends.hyperv.config import HyperVVmConfig
from testbed.backends.registry import BackendKind, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend
    from testbed.config import HostEntry


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.hyperv.backend import HyperVBackend
    from testbed.hosts import powershell_for

    return HyperVBackend(powershell_for(entry, opts))


KIND = BackendKind(
    kind="hyperv",
    description="a Hyper-V host (WinRM)",
    vm_config=HyperVVmConfig,
    open=open_backend,
    schemes=("local", "ssh", "winrm", "winrms"),
    claims=("winrm", "winrms"),
    host_playbook="hyperv-host.yml",
    host_os="windows",
    labels={"nested": "a nested Hyper-V host"},
)
