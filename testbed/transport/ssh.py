"""A Linux host over SSH (paramiko).

Host keys are checked strictly against known_hosts; trust on first use is
opt-in (``insecure_accept_new``) and named so.  Only connection setup is
retried (tenacity, bounded, each retry logged); a command that may have
changed state on the host is never retried blindly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shlex
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import paramiko
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from testbed.core.redact import redact
from testbed.transport.base import CommandResult, OutputCollector, TransportError
from testbed.transport.local import sha256_file

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 5


AGENT_EXIT_WAIT_S = 30.0  # how long closing a host program waits for its exit status
REQUEST_DEADLINE_S = 30.0  # a channel or an SFTP session opened, a program started
TRANSFER_FLOOR_BPS = 256 * 1024  # the slowest link a transfer's deadline allows for


class HostKeyError(TransportError):
    """The host's key is unknown or does not match known_hosts."""


class AuthError(TransportError):
    """The host refused every credential offered."""


class SshTransport:
    is_local = False

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str | None = None,
        *,
        identity: str | None = None,
        password_env: str | None = None,
        known_hosts: str | None = None,
        insecure_accept_new: bool = False,
    ) -> None:
        self.host, self.port = host, port
        self.user = user or os.environ.get("USER") or "root"
        self.identity = identity
        self.password_env = password_env
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.insecure_accept_new = insecure_accept_new
        self.name = f"ssh://{self.user}@{host}:{port}"
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, **kw: object) -> SshTransport:
        u = urlparse(uri)
        if u.scheme != "ssh" or not u.hostname:
            raise TransportError(f"bad SSH URI {redact(uri)!r}: use ssh://user@host[:port]")
        return cls(u.hostname, u.port or 22, u.username, **kw)  # type: ignore[arg-type]

    # ---- connection ------------------------------------------------------------
    @property
    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None or not self._alive(self._client):
                self._client = self._connect()
                self._sftp = None
            return self._client

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """One SFTP session per connection: opening one costs round trips on a slow link."""
        client = self.client  # a reconnect forgets the old session
        if self._sftp is None:
            with self._deadline("opening SFTP", REQUEST_DEADLINE_S):
                try:
                    self._sftp = client.open_sftp()
                except (paramiko.SSHException, OSError, EOFError) as e:
                    raise TransportError(f"{self.name}: cannot open SFTP: {e}") from None
        return self._sftp

    @staticmethod
    def _alive(c: paramiko.SSHClient) -> bool:
        t = c.get_transport()
        return t is not None and t.is_active()

    @contextlib.contextmanager
    def _deadline(self, what: str, seconds: float | None) -> Iterator[None]:
        """Some paramiko waits have no timeout of their own (a channel request, an SFTP
        reply, an exit status that never comes): past ``seconds`` the connection is
        dropped (logged), the wait ends with an error, and it becomes a TransportError
        that says so. The next call connects afresh. It connects first if needed (the
        connection has its own timeouts)."""
        if seconds is None:
            yield
            return
        client = self.client
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            log.warning(
                "%s: %s got no answer within %.0f s; dropping the connection", self.name, what, seconds
            )
            t = client.get_transport()
            if t is not None:
                t.close()

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        late = TransportError(f"{self.name}: {what} got no answer within {seconds:.0f} s")
        try:
            yield
        except (paramiko.SSHException, OSError, EOFError, TransportError) as e:
            raise (late if expired.is_set() else e) from None
        finally:
            timer.cancel()
        if expired.is_set():  # it ended only because the connection was dropped (-1, no status)
            raise late

    def _connect(self) -> paramiko.SSHClient:
        try:
            return self._connect_with_retries()
        except paramiko.BadHostKeyException as e:
            raise HostKeyError(
                f"{self.name}: host key mismatch for {e.hostname} (got {e.key.get_name()} "
                f"{e.key.get_base64()[:16]}..., known_hosts {self.known_hosts} has another). Someone may be "
                "intercepting the connection, or the host was reinstalled: check, then fix known_hosts."
            ) from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise HostKeyError(
                    f"{self.name}: host key not in {self.known_hosts}. Add it (ssh-keyscan -p {self.port} "
                    f"{self.host} >> {self.known_hosts}, after checking it) or pass --insecure-accept-new."
                ) from None
            raise TransportError(f"{self.name}: {e}") from None
        except (OSError, EOFError) as e:
            raise TransportError(f"{self.name}: cannot connect: {e}") from None

    @retry(
        retry=retry_if_exception_type((OSError, EOFError, paramiko.ssh_exception.NoValidConnectionsError)),
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.5, max=4),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    def _connect_with_retries(self) -> paramiko.SSHClient:
        c = paramiko.SSHClient()
        if os.path.exists(self.known_hosts):
            c.load_host_keys(self.known_hosts)
        if self.insecure_accept_new:
            log.warning("%s: --insecure-accept-new: trusting an unknown host key on first use", self.name)
            c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            c.set_missing_host_key_policy(paramiko.RejectPolicy())
        password = os.environ.get(self.password_env) if self.password_env else None
        try:
            c.connect(
                self.host,
                self.port,
                self.user,
                password=password,
                key_filename=self.identity,
                allow_agent=True,
                look_for_keys=self.identity is None,
                timeout=CONNECT_TIMEOUT_S,
                auth_timeout=CONNECT_TIMEOUT_S,
                banner_timeout=CONNECT_TIMEOUT_S,
            )
        except paramiko.AuthenticationException as e:
            raise AuthError(f"{self.name}: authentication failed ({e}); check the key or agent") from None
        t = c.get_transport()
        assert t is not None
        t.set_keepalive(KEEPALIVE_S)
        if self.insecure_accept_new:
            c.save_host_keys(self.known_hosts)
        return c

    # ---- commands ----------------------------------------------------------------
    def run(
        self,
        argv: list[str],
        *,
        input: bytes | None = None,
        timeout: float | None = 120,
        on_output: Callable[[str, str], None] | None = None,
    ) -> CommandResult:
        """argv is quoted with shlex for the remote shell: every argument arrives verbatim."""
        command = shlex.join(argv)
        try:
            with self._deadline(f"`{argv[0]}`", timeout + REQUEST_DEADLINE_S if timeout else None):
                return self._run(argv, command, input, timeout, on_output)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{self.name}: connection lost during {argv[0]}: {e}") from None

    def _run(
        self,
        argv: list[str],
        command: str,
        input: bytes | None,
        timeout: float | None,
        on_output: Callable[[str, str], None] | None,
    ) -> CommandResult:
        """One command, its output pumped (stderr on a thread of its own), its exit status."""
        stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        try:
            if input:
                stdin.write(input)
            # Closed here, never left to the garbage collector: a ChannelStdinFile
            # whose __del__ runs on paramiko's transport thread while it closes the
            # channel (holding the channel's lock) deadlocks that thread, and every
            # later exec on the connection waits for it forever.
            stdin.close()
            out = OutputCollector(on_output)
            t = threading.Thread(target=out.pump, args=("stderr", stderr))
            t.start()
            out.pump("stdout", stdout)
            t.join()
            rc = stdout.channel.recv_exit_status()
        finally:
            for f in (stdin, stdout, stderr):
                f.close()
        return out.result(argv, rc)

    # ---- files ---------------------------------------------------------------------
    def put(self, local: Path, remote: str) -> bool:
        want = sha256_file(local)
        # One round trip: make the folder (the upload needs it) and hash what is there.
        script = 'mkdir -p "$1" && { sha256sum "$2" 2>/dev/null || true; }'
        r = self.run(["sh", "-c", script, "sh", posixpath.dirname(remote) or ".", remote]).check()
        have = r.stdout.split()
        if have and have[0] == want:
            return False
        try:
            with self._deadline(f"the upload of {local.name}", _transfer_s(local.stat().st_size)):
                self.sftp.put(str(local), remote + ".part")
                self.sftp.posix_rename(remote + ".part", remote)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{self.name}: upload of {local.name} failed: {e}") from None
        return True

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.sftp.stat(remote).st_size or 0
            with self._deadline(f"the download of {remote}", _transfer_s(size)):
                self.sftp.get(remote, str(local))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{self.name}: download of {remote} failed: {e}") from None

    # ---- agent and clock --------------------------------------------------------------
    def open_agent(self, argv: list[str]) -> tuple[IO[bytes], IO[bytes], Callable[[], None]]:
        """An exec channel without a PTY: sshd sends no SIGHUP when it drops, so
        the agent itself kills its QEMU when its stdin closes."""
        try:
            with self._deadline(f"starting {argv[-1]}", REQUEST_DEADLINE_S):
                stdin, stdout, _stderr = self.client.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{self.name}: cannot start the host agent: {e}") from None
        chan = stdout.channel

        def close() -> None:
            """The agent's stdin closed, then its exit awaited, but not forever: a remote
            program that lingers (or a descendant that keeps the session's pipes) must not
            hang the controller; the channel is closed after AGENT_EXIT_WAIT_S regardless."""
            try:
                chan.shutdown_write()
                if not chan.status_event.wait(AGENT_EXIT_WAIT_S):
                    log.warning("%s: the host program did not exit within %.0f s of its stdin closing; "
                                "closing the channel", self.name, AGENT_EXIT_WAIT_S)  # fmt: skip
            except (OSError, EOFError, paramiko.SSHException):
                pass
            chan.close()

        return stdin, stdout, close  # type: ignore[return-value]

    def clock_ns(self) -> int:
        r = self.run(["python3", "-c", "import time; print(time.monotonic_ns())"]).check()
        return int(r.stdout.strip())

    def sever(self) -> None:
        """Drop the TCP connection abruptly (tests: a host lost mid-iteration)."""
        c = self._client
        if c is not None and (t := c.get_transport()) is not None:
            sock = t.sock
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)
            t.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._sftp = None


def _transfer_s(size: int) -> float:
    """How long a transfer of ``size`` bytes may take before it is called stuck."""
    return REQUEST_DEADLINE_S + size / TRANSFER_FLOOR_BPS
