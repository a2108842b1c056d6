"""From what the user typed (a URI or an inventory name) to a host entry and its backend.

Which kind a host is comes from the registry (``testbed.backends.registry``):
an inventory entry says it; a bare URI gets the kind its scheme implies
(``winrms://`` is Hyper-V), else the kind of the vm_config in use, else the
default.  The routes to a host (SSH, WinRM, PowerShell) are chosen here, once,
for every backend that needs one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.backends import registry
from testbed.backends.registry import HostOptions
from testbed.config import DEFAULT_BACKEND, ConfigError, HostEntry, load_inventory
from testbed.redact import redact
from testbed.transport import Transport, open_transport
from testbed.transport.ssh import SshTransport

if TYPE_CHECKING:
    from testbed.backends.base import Backend
    from testbed.transport.powershell import PowerShellRunner

DEFAULT_INVENTORY = "TESTBED_INVENTORY"
DEFAULT_WINRM_PASSWORD_ENV = "TESTBED_WINRM_PASSWORD"
DIRECT = HostOptions()  # no command-line additions


def lookup_entry(host: str, inventory: Path | None = None, *, kind: str | None = None) -> HostEntry:
    """``local``, a URI, or the name of an inventory entry -> its entry.

    ``kind`` (the backend of the vm_config in use) decides a bare URI whose
    scheme more than one kind accepts (``ssh://`` to a Linux QEMU host or to
    Windows OpenSSH on a Hyper-V host)."""
    inv_path = inventory or (
        Path(os.environ[DEFAULT_INVENTORY]) if os.environ.get(DEFAULT_INVENTORY) else None
    )
    if "://" in host or host == "local":
        claimed = registry.claiming(host)
        chosen = claimed.kind if claimed else (kind or DEFAULT_BACKEND)
        try:
            return HostEntry(name=host, uri=host, kind=chosen)
        except ValueError as e:
            raise ConfigError(Path("--host"), None, f"{redact(host)}: {_first_error(e)}") from None
    if inv_path is None:
        raise ConfigError(Path("--host"), None, f"{host!r} is not a URI and no --inventory was given")
    entry = load_inventory(inv_path).find(host)
    if entry is None:
        raise ConfigError(inv_path, None, f"no host named {host!r} in the inventory")
    return entry


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    return str(errors()[0]["msg"]) if callable(errors) else str(e)


def transport_for(entry: HostEntry, opts: HostOptions = DIRECT) -> Transport:
    """A Linux host's transport: SSH with the entry's settings, or this machine."""
    if entry.uri.startswith("ssh://"):
        return SshTransport.from_uri(
            entry.uri,
            identity=opts.identity or entry.identity_file,
            password_env=entry.password_env,
            known_hosts=entry.known_hosts,
            insecure_accept_new=opts.insecure_accept_new or entry.insecure_accept_new,
        )
    return open_transport(entry.uri)


def powershell_for(entry: HostEntry, opts: HostOptions = DIRECT) -> PowerShellRunner:
    """The route to a Windows host's PowerShell, chosen by the URI: ``winrm(s)://``,
    ``ssh://`` (Windows OpenSSH), or ``local`` (testbed runs on the Windows host)."""
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
        return SshPowerShell(transport_for(entry, opts))
    return LocalPowerShell()


def open_backend(entry: HostEntry, cfg_backend: str | None = None, opts: HostOptions = DIRECT) -> Backend:
    """The backend of the host's kind; refused when the vm_config is for another kind."""
    if cfg_backend is not None and cfg_backend != entry.kind:
        raise ConfigError(Path("--host"), None,
                          f"the vm_config is for backend {cfg_backend}, but host {entry.name!r} is {entry.kind}")  # fmt: skip
    return registry.get(entry.kind).open(entry, opts)
