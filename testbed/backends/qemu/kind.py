"""The qemu backend kind: how testbed finds and opens it (entry point ``testbed.backends``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from testbed.backends.qemu.capabilities import CAPABILITIES
from testbed.backends.qemu.config import QemuVmConfig
from testbed.backends.registry import BackendKind
from testbed.core.config import HostEntry, HostOptions

if TYPE_CHECKING:
    from testbed.backends.base import Backend


class QemuHostEntry(HostEntry):
    """A QEMU host's inventory entry: where it keeps QEMU, when not on PATH."""

    qemu_binary: str | None = Field(
        None,
        description="QEMU on this host (default: qemu-system-x86_64 on PATH, else /usr/libexec/qemu-kvm)",
    )


def open_backend(entry: HostEntry, opts: HostOptions) -> Backend:
    from testbed.backends.qemu.backend import QemuBackend
    from testbed.transport import transport_for

    binary = entry.qemu_binary if isinstance(entry, QemuHostEntry) else None
    return QemuBackend(transport_for(entry, opts), qemu_binary=binary, max_guests=entry.max_guests)


def _commands() -> dict[str, Any]:
    from testbed.backends.qemu.commands import commands

    return commands()


KIND = BackendKind(
    capabilities=CAPABILITIES,
    typical_iteration_s=3.0,
    kind="qemu",
    description="a QEMU host (local or over SSH)",
    vm_config=QemuVmConfig,
    open=open_backend,
    schemes=("local", "ssh"),
    host_playbook="kvm-host.yml",
    host_entry=QemuHostEntry,
    commands=_commands,
)
