"""PowerShell on a Windows host over WinRM (pywinrm).

The scripts and the upload protocol are shared with the other routes
(testbed.transport.powershell); this class only delivers a command line over
WS-Management: HTTPS with certificate validation by default, NTLM (with
message encryption over HTTP), Kerberos, CredSSP or Basic, as pywinrm allows.
The password comes from an environment variable named by the inventory and is
never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlparse

import requests
import winrm
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_attempt, wait_exponential
from winrm.exceptions import InvalidCredentialsError, WinRMError, WinRMTransportError, WSManFaultError
from winrm.protocol import Protocol

from testbed.core.redact import redact
from testbed.transport.base import TransportError
from testbed.transport.powershell import PowerShellRunner

log = logging.getLogger(__name__)
AUTHS = ("ntlm", "kerberos", "credssp", "basic", "certificate")
# ERROR_WSMAN_INVALID_SELECTORS: what a command sent to a shell the host no longer has gets.
SHELL_NOT_FOUND = 2150858843


class WinRmAuthError(TransportError):
    """The host refused the credentials (HTTP 401)."""


class WinRmPowerShell(PowerShellRunner):
    def __init__(
        self,
        endpoint: str,
        user: str,
        password: str,
        *,
        auth: str = "ntlm",
        verify_tls: bool = True,
        ca_bundle: str | None = None,
    ) -> None:
        if auth not in AUTHS:
            raise ValueError(f"unknown WinRM auth {auth!r}; allowed: {', '.join(AUTHS)}")
        self.endpoint = endpoint
        self.user = user
        self.name = f"winrm {user}@{urlparse(endpoint).netloc}"
        kw: dict[str, Any] = {
            "transport": auth,
            "server_cert_validation": "validate" if verify_tls else "ignore",
        }
        if ca_bundle:
            kw["ca_trust_path"] = ca_bundle
        elif verify_tls:
            # pywinrm otherwise falls back to REQUESTS_CA_BUNDLE with a warning: be explicit.
            import certifi

            kw["ca_trust_path"] = os.environ.get("REQUESTS_CA_BUNDLE") or certifi.where()
        self._auth = (user, password)
        self._kw = kw
        self._session: winrm.Session | None = None
        self._shell: str | None = None  # one shell per connection, one powershell.exe per command

    def _connect(self) -> winrm.Session:
        return winrm.Session(self.endpoint, auth=self._auth, **self._kw)

    @classmethod
    def from_uri(cls, uri: str, password_env: str, *, auth: str = "ntlm", verify_tls: bool = True,
                 ca_bundle: str | None = None) -> WinRmPowerShell:  # fmt: skip
        """``winrms://user@host[:port]`` (HTTPS, the default kind) or ``winrm://`` (HTTP)."""
        u = urlparse(uri)
        if u.scheme not in ("winrm", "winrms") or not u.hostname or not u.username:
            raise TransportError(f"bad WinRM URI {redact(uri)!r}: use winrms://user@host[:port]")
        user = unquote(u.username)  # DOMAIN%5Cuser in a URI is DOMAIN\\user
        password = os.environ.get(password_env)
        if password is None:
            password = _from_keyring(u.hostname, user)
        if password is None:
            raise TransportError(
                f"{redact(uri)}: the password variable {password_env} is not set "
                f"(or store it with: keyring set testbed {user}@{u.hostname})"
            )
        scheme, port = ("https", 5986) if u.scheme == "winrms" else ("http", 5985)
        endpoint = f"{scheme}://{u.hostname}:{u.port or port}/wsman"
        return cls(endpoint, user, password, auth=auth, verify_tls=verify_tls, ca_bundle=ca_bundle)

    def execute(self, argv: list[str], stdin: Iterable[bytes] = ()) -> tuple[int, str, str]:
        if self._session is None:
            self._session = self._connect()
        try:
            out, err, rc = self._command(self._session.protocol, argv, stdin)
        except InvalidCredentialsError as e:
            self._drop()
            raise WinRmAuthError(f"{self.name}: credentials refused (401): check the user and {e}") from None
        except (WinRMTransportError, WinRMError, requests.RequestException, OSError) as e:
            # A broken connection takes its authenticated (and sealed) context with it:
            # the next command starts a new session. The failed command is not retried.
            self._drop()
            raise TransportError(f"{self.name}: {type(e).__name__}: {e}") from None
        return rc, out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace")

    def _drop(self) -> None:
        self._session = None
        self._shell = None

    def _command(self, p: Protocol, argv: list[str], stdin: Iterable[bytes]) -> tuple[bytes, bytes, int]:
        """One command (its own powershell.exe) in the run's warm shell; stdin goes as
        WS-Man Send messages, the last with End, read from ``stdin`` one line at a time
        (a multi-GB upload is never held whole). Keeping the shell open saves its Create
        and Delete exchanges on every call (5-6 exchanges become 3-4). A shell the host
        has dropped (idle timeout, WinRM restart) refuses the command before it starts:
        then, and only then, a new shell is opened and the command sent to it (logged).

        With stdin, the command is started with WINRS_CONSOLEMODE_STDIN=FALSE (as Ansible's
        put_file does): pywinrm's default TRUE hands the stream to the process's console
        input, and powershell.exe's ``$input`` pipeline never sees it."""
        lines = iter(stdin)
        first = next(lines, None)
        console = first is None
        if self._shell is None:
            self._shell = _open_shell(p)
        try:
            cmd = p.run_command(self._shell, argv[0], argv[1:], console_mode_stdin=console)
        except WSManFaultError as e:
            if e.wsman_fault_code != SHELL_NOT_FOUND:
                raise
            log.warning("%s: the host dropped the WinRM shell (%s); opening a new one", self.name, e.reason)
            self._shell = _open_shell(p)
            cmd = p.run_command(self._shell, argv[0], argv[1:], console_mode_stdin=console)
        shell = self._shell
        try:
            pending = first
            for line in lines:
                assert pending is not None
                p.send_command_input(shell, cmd, pending)
                pending = line
            if pending is not None:
                p.send_command_input(shell, cmd, pending, end=True)
            out, err, rc = p.get_command_output(shell, cmd)
            p.cleanup_command(shell, cmd)
        except BaseException:
            # The shell may still hold the command: delete it (keeping the first failure,
            # not the cleanup's); the next command gets a new one.
            self._shell = None
            with contextlib.suppress(Exception):
                p.close_shell(shell)
            raise
        return out, err, rc

    def close(self) -> None:
        """Delete the warm shell (the host would keep it until its idle timeout)."""
        if self._session is not None and self._shell is not None:
            with contextlib.suppress(Exception):
                self._session.protocol.close_shell(self._shell)
        self._drop()


@retry(
    retry=retry_if_exception_type(requests.ConnectionError),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=2),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)
def _open_shell(p: Protocol) -> str:
    """Connection setup is retried (bounded, each retry logged): nothing has run yet. A
    command, once sent, is never retried. Code page 65001 (UTF-8, as Ansible opens it):
    output is read as UTF-8, and a localized host's messages would be mangled in 437."""
    return str(p.open_shell(codepage=65001))


def _from_keyring(host: str, user: str) -> str | None:
    """The OS keyring, when the optional ``keyring`` package is installed."""
    import importlib

    try:
        keyring = importlib.import_module("keyring")
    except ImportError:
        return None
    try:
        got = keyring.get_password("testbed", f"{user}@{host}")
        return str(got) if got is not None else None
    except Exception as e:  # no usable keyring backend: same as not stored
        log.debug("keyring unavailable: %s", e)
        return None
