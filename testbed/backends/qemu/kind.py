"""The qemu backend kind: how testbed finds and opens it (entry point ``testbed.backends``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.backends.qemu.config import QemuVmConfig
from testbed.backends.registry import BackendKind, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend
    from testbed.config import HostEntry


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.qemu.backend import QemuBackend
    from testbed.hosts import transport_for

    return QemuBackend(transport_for(entry, opts), qemu_binary=entry.qemu_binary, max_guests=entry.max_guests)


KIND = BackendKind(
    kind="qemu",
    description="a QEMU host (local or over SSH)",
    vm_config=QemuVmConfig,
    open=open_backend,
    schemes=("local", "ssh"),
    host_playbook="kvm-host.yml",
)
