"""How testbed reaches a host: local processes, or SSH (paramiko).

Every transport runs commands with arguments passed as data (an argv list;
where a remote shell is unavoidable, each argument is quoted with shlex),
streams output, moves files (skipping an upload whose remote hash matches),
opens the host agent's pipes, and reads the host's monotonic clock.
"""

from testbed.core.config import HostEntry, HostOptions
from testbed.core.redact import redact
from testbed.transport.base import CommandResult, Transport, TransportError
from testbed.transport.local import LocalTransport

__all__ = [
    "CommandResult",
    "LocalTransport",
    "Transport",
    "TransportError",
    "open_transport",
    "transport_for",
]


def open_transport(uri: str, *, insecure_accept_new: bool = False, identity: str | None = None) -> Transport:
    """``local`` or ``ssh://user@host[:port]``."""
    if uri in ("local", "local://"):
        return LocalTransport()
    if uri.startswith("ssh://"):
        from testbed.transport.ssh import SshTransport

        return SshTransport.from_uri(uri, insecure_accept_new=insecure_accept_new, identity=identity)
    raise TransportError(f"unsupported host URI {redact(uri)!r}: use 'local' or 'ssh://user@host[:port]'")


def transport_for(entry: HostEntry, opts: HostOptions | None = None) -> Transport:
    """A Linux (or Windows OpenSSH) host's transport: SSH with the entry's settings, or
    this machine."""
    opts = opts or HostOptions()
    if entry.uri.startswith("ssh://"):
        from testbed.transport.ssh import SshTransport

        return SshTransport.from_uri(
            entry.uri,
            identity=opts.identity or entry.identity_file,
            password_env=entry.password_env,
            known_hosts=entry.known_hosts,
            insecure_accept_new=opts.insecure_accept_new or entry.insecure_accept_new,
        )
    return open_transport(entry.uri)
