"""From what the user typed (a URI or an inventory name) to a host entry and its backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.config import ConfigError, HostEntry, load_inventory
from testbed.transport import Transport, open_transport
from testbed.transport.ssh import SshTransport

if TYPE_CHECKING:
    from testbed.backends.base import Backend
    from testbed.transport.powershell import PowerShellRunner

DEFAULT_INVENTORY = "TESTBED_INVENTORY"


def lookup_entry(host: str, inventory: Path | None = None) -> HostEntry:
    """``local``, a URI, or the name of an inventory entry -> its entry."""
    inv_path = inventory or (
        Path(os.environ[DEFAULT_INVENTORY]) if os.environ.get(DEFAULT_INVENTORY) else None
    )
    if "://" in host or host == "local":
        kind = "hyperv" if host.startswith(("winrm://", "winrms://")) else "qemu"
        return HostEntry(name=host, uri=host, kind=kind)
    if inv_path is None:
        raise ConfigError(Path("--host"), None, f"{host!r} is not a URI and no --inventory was given")
    entry = load_inventory(inv_path).find(host)
    if entry is None:
        raise ConfigError(inv_path, None, f"no host named {host!r} in the inventory")
    return entry


def transport_for(
    entry: HostEntry, *, insecure_accept_new: bool = False, identity: str | None = None
) -> Transport:
    """A QEMU host's transport: SSH with the entry's settings, or this machine."""
    if entry.uri.startswith("ssh://"):
        return SshTransport.from_uri(
            entry.uri,
            identity=identity or entry.identity_file,
            password_env=entry.password_env,
            known_hosts=entry.known_hosts,
            insecure_accept_new=insecure_accept_new or entry.insecure_accept_new,
        )
    return open_transport(entry.uri)


DEFAULT_WINRM_PASSWORD_ENV = "TESTBED_WINRM_PASSWORD"


def powershell_for(
    entry: HostEntry, *, insecure_accept_new: bool = False, identity: str | None = None
) -> PowerShellRunner:
    """The route to a Windows host's PowerShell, chosen by the URI: ``winrm(s)://``,
    ``ssh://`` (Windows OpenSSH), or ``local`` (testbed runs on the Hyper-V host)."""
    from testbed.transport.powershell import LocalPowerShell, SshPowerShell
    from testbed.transport.winrm import WinRmPowerShell

    if entry.uri.startswith(("winrm://", "winrms://")):
        return WinRmPowerShell.from_uri(
            entry.uri,
            entry.password_env or DEFAULT_WINRM_PASSWORD_ENV,
            auth=entry.winrm_auth,
            verify_tls=entry.verify_tls,
            ca_bundle=entry.ca_bundle,
        )
    if entry.uri.startswith("ssh://"):
        return SshPowerShell(transport_for(entry, insecure_accept_new=insecure_accept_new, identity=identity))
    return LocalPowerShell()


def open_backend(
    entry: HostEntry,
    cfg_backend: str | None = None,
    *,
    insecure_accept_new: bool = False,
    identity: str | None = None,
) -> Backend:
    """The backend for a host: its inventory kind, or the vm_config's backend for a bare URI."""
    from testbed.backends.hyperv.backend import HyperVBackend
    from testbed.backends.qemu.backend import QemuBackend

    kind = entry.kind
    if cfg_backend == "hyperv" and entry.kind == "qemu" and not entry.uri.startswith("winrm"):
        kind = "hyperv"  # ssh:// or local named directly, with a Hyper-V vm_config
    if cfg_backend is not None and cfg_backend != kind:
        raise ConfigError(Path("--host"), None,
                          f"the vm_config is for backend {cfg_backend}, but host {entry.name!r} is {kind}")  # fmt: skip
    kw: dict[str, Any] = {"insecure_accept_new": insecure_accept_new, "identity": identity}
    if kind == "hyperv":
        return HyperVBackend(powershell_for(entry, **kw))
    if kind == "qemu":
        return QemuBackend(transport_for(entry, **kw))
    raise ConfigError(Path("--host"), None, f"host {entry.name!r}: kind {kind} is not supported yet")
