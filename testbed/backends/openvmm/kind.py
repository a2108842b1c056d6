"""The openvmm backend kind: how testbed finds and opens it (entry point ``testbed.backends``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.backends.openvmm.capabilities import CAPABILITIES
from testbed.backends.openvmm.config import OpenVmmVmConfig
from testbed.backends.registry import BackendKind
from testbed.core.config import HostEntry, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.openvmm.backend import OpenVmmBackend
    from testbed.transport import transport_for

    return OpenVmmBackend(transport_for(entry, opts))


KIND = BackendKind(
    capabilities=CAPABILITIES,
    typical_iteration_s=15.0,
    kind="openvmm",
    description="an OpenVMM host",
    vm_config=OpenVmmVmConfig,
    open=open_backend,
    schemes=("local", "ssh"),
    host_playbook="openvmm-host.yml",
    host_os="windows",
)
