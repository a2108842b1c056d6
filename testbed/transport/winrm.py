"""PowerShell on a Windows host over WinRM (pywinrm).

Scripts go as ``powershell -encodedcommand`` (UTF-16LE, base64), which cmd.exe
limits to 8191 characters, so a module is uploaded once in chunks (hash-checked)
and each call afterwards is a short fixed script plus its parameters as base64
JSON: user values are data inside a single-quoted base64 literal, never
PowerShell syntax. Results come back as JSON; error records (CLIXML on stderr)
and non-zero exits become typed errors with the host's message. Passwords come
from an environment variable named by the inventory and are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from typing import Any
from urllib.parse import urlparse

import requests
import winrm
from winrm.exceptions import InvalidCredentialsError, WinRMError, WinRMTransportError

from testbed.backends.hyperv.clixml import ClixmlError, error_messages
from testbed.transport.base import TransportError

log = logging.getLogger(__name__)

CMD_LIMIT = 8191  # cmd.exe's command-line limit, which -encodedcommand lives within
# Raw bytes per upload call: the chunk is base64 inside base64 JSON inside a script that
# becomes UTF-16LE and base64 again (x ~4.7 overall), under 8191 characters with room to spare.
CHUNK_BYTES = 1200
FUNCTION = re.compile(r"^[A-Z][A-Za-z]+-Testbed[A-Za-z]+$")


class WinRmAuthError(TransportError):
    """The host refused the credentials (HTTP 401)."""


class PowerShellError(Exception):
    """A script failed on the host: its error records, or a non-zero exit."""

    def __init__(self, message: str, exit_code: int, records: list[str]) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.records = records


def encoded_command(script: str) -> str:
    return (
        "powershell -NoProfile -NonInteractive -encodedcommand "
        + base64.b64encode(script.encode("utf-16-le")).decode()
    )


def _b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


# The fixed scripts. {b64} is the only substitution, and it is base64 (A-Z a-z 0-9 + / =).
_ARGS = "$a = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{b64}')) | ConvertFrom-Json\n"
APPEND_CHUNK = _ARGS + (
    "$d = Split-Path -Parent $a.path; if (-not (Test-Path $d)) {{ New-Item -ItemType Directory -Path $d | Out-Null }}\n"
    "$m = if ($a.first) {{ [IO.FileMode]::Create }} else {{ [IO.FileMode]::Append }}\n"
    "$s = [IO.File]::Open($a.path + '.part', $m); $b = [Convert]::FromBase64String($a.data)\n"
    "$s.Write($b, 0, $b.Length); $s.Close()\n"
)
FINISH_UPLOAD = _ARGS + (
    "$h = (Get-FileHash -Algorithm SHA256 -Path ($a.path + '.part')).Hash.ToLower()\n"
    "if ($h -ne $a.sha256) {{ Remove-Item ($a.path + '.part'); throw \"upload of $($a.path) corrupted: $h\" }}\n"
    "Move-Item -Force ($a.path + '.part') $a.path; @{{ sha256 = $h }} | ConvertTo-Json -Compress\n"
)
FILE_HASH = _ARGS + (
    "if (Test-Path $a.path) {{ @{{ sha256 = (Get-FileHash -Algorithm SHA256 -Path $a.path).Hash.ToLower() }} }}"
    " else {{ @{{ sha256 = '' }} }} | ConvertTo-Json -Compress\n"
)
CALL = _ARGS + (
    "Import-Module -Force $a.module\n"
    "$p = @{{}}; $a.params.psobject.Properties | ForEach-Object {{ $p[$_.Name] = $_.Value }}\n"
    "$r = & $a.function @p\n"
    "ConvertTo-Json -InputObject $r -Depth 8 -Compress\n"
)


class WinRmPowerShell:
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
        self.endpoint = endpoint
        self.user = user
        self.name = f"winrm {user}@{urlparse(endpoint).netloc}"
        kw: dict[str, Any] = {
            "transport": auth,
            "server_cert_validation": "validate" if verify_tls else "ignore",
        }
        if ca_bundle:
            kw["ca_trust_path"] = ca_bundle
        self._session = winrm.Session(endpoint, auth=(user, password), **kw)

    @classmethod
    def from_uri(cls, uri: str, password_env: str, *, auth: str = "ntlm", verify_tls: bool = True,
                 ca_bundle: str | None = None) -> WinRmPowerShell:  # fmt: skip
        """``winrms://user@host[:port]`` (HTTPS, the default kind) or ``winrm://`` (HTTP)."""
        u = urlparse(uri)
        if u.scheme not in ("winrm", "winrms") or not u.hostname or not u.username:
            raise TransportError(f"bad WinRM URI {uri!r}: use winrms://user@host[:port]")
        password = os.environ.get(password_env)
        if password is None:
            raise TransportError(f"{uri}: the password variable {password_env} is not set")
        scheme, port = ("https", 5986) if u.scheme == "winrms" else ("http", 5985)
        endpoint = f"{scheme}://{u.hostname}:{u.port or port}/wsman"
        return cls(endpoint, u.username, password, auth=auth, verify_tls=verify_tls, ca_bundle=ca_bundle)

    # ---- scripts ------------------------------------------------------------------
    def run(self, script: str) -> str:
        """Run a script; returns stdout. Raises PowerShellError, WinRmAuthError, TransportError."""
        command = encoded_command(script)
        if len(command) > CMD_LIMIT:
            raise ValueError(
                f"script too long for one command line ({len(command)} > {CMD_LIMIT}): upload it"
            )
        try:
            r = self._session.run_cmd(command)
        except InvalidCredentialsError as e:
            raise WinRmAuthError(f"{self.name}: credentials refused (401): check the user and {e}") from None
        except (WinRMTransportError, WinRMError, requests.RequestException, OSError) as e:
            raise TransportError(f"{self.name}: {type(e).__name__}: {e}") from None
        stdout = r.std_out.decode("utf-8", errors="replace")
        stderr = r.std_err.decode("utf-8", errors="replace")
        try:
            records = error_messages(stderr)
        except ClixmlError as e:
            raise PowerShellError(str(e), r.status_code, []) from None
        if r.status_code != 0 or records:
            msg = "; ".join(records) or f"exit code {r.status_code}"
            raise PowerShellError(f"{self.name}: {msg}", r.status_code, records)
        return stdout

    def run_json(self, template: str, args: dict[str, Any]) -> Any:
        out = self.run(template.format(b64=_b64json(args))).strip()
        try:
            return json.loads(out) if out else None
        except ValueError:
            raise PowerShellError(f"{self.name}: output is not JSON: {out[:200]!r}", 0, []) from None

    def invoke(self, module: str, function: str, params: dict[str, Any]) -> Any:
        """Call a function of an uploaded module with named parameters (as data)."""
        if not FUNCTION.match(function):
            raise ValueError(f"not a Testbed module function name: {function!r}")
        return self.run_json(CALL, {"module": module, "function": function, "params": params})

    # ---- files ----------------------------------------------------------------------
    def upload(self, data: bytes, remote_path: str) -> bool:
        """Upload in chunks that each fit the command-line limit; skipped when the host's copy has the same sha256."""
        want = hashlib.sha256(data).hexdigest()
        if self.run_json(FILE_HASH, {"path": remote_path})["sha256"] == want:
            return False
        for i in range(0, len(data), CHUNK_BYTES):
            chunk = base64.b64encode(data[i : i + CHUNK_BYTES]).decode()
            self.run(APPEND_CHUNK.format(b64=_b64json({"path": remote_path, "data": chunk, "first": i == 0})))
        got = self.run_json(FINISH_UPLOAD, {"path": remote_path, "sha256": want})["sha256"]
        if got != want:
            raise TransportError(f"{self.name}: upload of {remote_path} came out as {got}")
        log.info("%s: uploaded %s (%d bytes)", self.name, remote_path, len(data))
        return True
