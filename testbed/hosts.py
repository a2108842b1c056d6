"""From what the user typed (a URI or an inventory name) to a transport."""

from __future__ import annotations

import os
from pathlib import Path

from testbed.config import ConfigError, HostEntry, load_inventory
from testbed.transport import Transport, open_transport
from testbed.transport.ssh import SshTransport

DEFAULT_INVENTORY = "TESTBED_INVENTORY"


def lookup_entry(host: str, inventory: Path | None = None) -> HostEntry:
    """``local``, a URI, or the name of an inventory entry -> its entry."""
    inv_path = inventory or (
        Path(os.environ[DEFAULT_INVENTORY]) if os.environ.get(DEFAULT_INVENTORY) else None
    )
    if "://" in host or host == "local":
        return HostEntry(name=host, uri=host)
    if inv_path is None:
        raise ConfigError(Path("--host"), None, f"{host!r} is not a URI and no --inventory was given")
    entry = load_inventory(inv_path).find(host)
    if entry is None:
        raise ConfigError(inv_path, None, f"no host named {host!r} in the inventory")
    return entry


def transport_for(
    entry: HostEntry, *, insecure_accept_new: bool = False, identity: str | None = None
) -> Transport:
    if entry.kind != "qemu":
        raise ConfigError(Path("--host"), None,
                          f"host {entry.name!r} is of kind {entry.kind}: not supported by this version")  # fmt: skip
    if entry.uri.startswith("ssh://"):
        return SshTransport.from_uri(
            entry.uri,
            identity=identity or entry.identity_file,
            password_env=entry.password_env,
            known_hosts=entry.known_hosts,
            insecure_accept_new=insecure_accept_new or entry.insecure_accept_new,
        )
    return open_transport(entry.uri)


def resolve_host(
    host: str,
    inventory: Path | None = None,
    *,
    insecure_accept_new: bool = False,
    identity: str | None = None,
) -> tuple[Transport, HostEntry]:
    """``local``, ``ssh://user@host[:port]``, or the name of an inventory entry."""
    entry = lookup_entry(host, inventory)
    return transport_for(entry, insecure_accept_new=insecure_accept_new, identity=identity), entry
