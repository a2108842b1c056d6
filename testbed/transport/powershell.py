"""PowerShell on a Windows host, whichever way it is reached.

One runner class per route, sharing everything but how a command line gets to
the host: WinRM (testbed.transport.winrm), SSH to Windows OpenSSH, a local
``powershell.exe``/``pwsh``, and PowerShell Direct into a nested VM.

Scripts go as ``powershell -EncodedCommand`` (UTF-16LE, base64), which cmd.exe
limits to 8191 characters, so files (the module, artifacts) are streamed on stdin
as base64 lines and hash-checked on the host, and each call is a short fixed
script plus its parameters as base64 JSON: user values are data inside a single-quoted base64 literal, never
PowerShell syntax. Results come back as JSON; error records (CLIXML on stderr)
and non-zero exits become typed errors with the host's message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_delay, wait_fixed

from testbed.transport.base import TransportError
from testbed.transport.clixml import ClixmlError, error_messages

log = logging.getLogger(__name__)

PS_DIRECT_POLL_S = 5.0  # between PowerShell Direct readiness probes
CMD_LIMIT = 8191  # cmd.exe's command-line limit, which -EncodedCommand lives within
FUNCTION = re.compile(r"^[A-Z][A-Za-z]+-Testbed[A-Za-z0-9]+$")


class PowerShellError(Exception):
    """A script failed on the host: its error records, or a non-zero exit."""

    def __init__(self, message: str, exit_code: int, records: list[str]) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.records = records


def encoded_argv(script: str) -> list[str]:
    """-ExecutionPolicy Bypass for this process only: Windows 11 client editions default
    to Restricted, which refuses to load testbed's .psm1 module (Server: RemoteSigned)."""
    return [
        "powershell",
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-EncodedCommand",
        base64.b64encode(script.encode("utf-16-le")).decode(),
    ]


def encoded_command(script: str) -> str:
    return " ".join(encoded_argv(script))


def b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


# The fixed scripts. {b64} is the only substitution, and it is base64 (A-Z a-z 0-9 + / =).
# $ProgressPreference: 5.1's progress bars make Invoke-WebRequest and Copy-Item -ToSession
# very slow and flood stderr with CLIXML progress records.
_ARGS = (
    "$ProgressPreference = 'SilentlyContinue'\n"
    "$a = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{b64}')) | ConvertFrom-Json\n"
)
# Upload: the file arrives on stdin as base64 lines, which powershell.exe feeds to the
# script's process block (as Ansible's WinRM put_file does); the host checks the sha256
# before the file takes its name.
STREAM_UPLOAD = (
    "begin {{\n"
    "    $a = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{b64}')) | ConvertFrom-Json\n"
    "    $d = Split-Path -Parent $a.path\n"
    "    if (-not (Test-Path $d)) {{ New-Item -ItemType Directory -Path $d | Out-Null }}\n"
    "    $fs = [IO.File]::Create($a.path + '.part')\n"
    "}}\n"
    "process {{ foreach ($line in $input) {{ if ($line) {{\n"
    "    $b = [Convert]::FromBase64String([string]$line); $fs.Write($b, 0, $b.Length) }} }} }}\n"
    "end {{\n"
    "    $fs.Close(); $h = (Get-FileHash -Algorithm SHA256 -Path ($a.path + '.part')).Hash.ToLower()\n"
    "    if ($h -ne $a.sha256) {{ Remove-Item ($a.path + '.part'); throw \"upload of $($a.path) corrupted: $h\" }}\n"
    "    Move-Item -Force ($a.path + '.part') $a.path; @{{ sha256 = $h }} | ConvertTo-Json -Compress\n"
    "}}\n"
)
FILE_HASH = _ARGS + (
    "$h = ''; if (Test-Path $a.path) {{ $h = (Get-FileHash -Algorithm SHA256 -Path $a.path).Hash.ToLower() }}\n"
    "@{{ sha256 = $h }} | ConvertTo-Json -Compress\n"
)
# The process's execution policy is set here too, not only on powershell.exe's command
# line: inside PowerShell Direct (nested) the session is L1's, under L1's own policy.
CALL = _ARGS + (
    "Set-ExecutionPolicy -Scope Process -ExecutionPolicy Bypass -Force\n"
    "Import-Module -Force $a.module\n"
    "$p = @{{}}; $a.params.psobject.Properties | ForEach-Object {{ $p[$_.Name] = $_.Value }}\n"
    "$r = & $a.function @p\n"
    "ConvertTo-Json -InputObject $r -Depth 8 -Compress\n"
)
# Answers with its own text: PowerShell Direct's readiness probe (runs inside L1).
READY_PROBE = "'testbed-ready'\n"
# PowerShell Direct (nested Hyper-V): the inner script is an argument of the script
# block, so it reaches the L1 VM as data. The L1 password comes on stdin (the first
# line of $input), never in the command: a command line is visible to process auditing
# (event 4688) and its decoded script to script-block logging (event 4104) on L0.
_CRED = (
    "$pw = [string](@($input)[0])\n"
    "$c = New-Object Management.Automation.PSCredential($a.user, (ConvertTo-SecureString $pw -AsPlainText -Force))\n"
)
IN_VM = (
    _ARGS
    + _CRED
    + (
        "Invoke-Command -VMName $a.vm -Credential $c -ArgumentList $a.script -ScriptBlock {{\n"
        "    param($s) & ([scriptblock]::Create($s)) }}\n"
    )
)
# A file already on L0 copied into the L1 VM over a PowerShell Direct session, then hashed there.
COPY_TO_VM = (
    _ARGS
    + _CRED
    + (
        "$s = New-PSSession -VMName $a.vm -Credential $c\n"
        "try {{\n"
        "    Invoke-Command -Session $s -ArgumentList $a.dest -ScriptBlock {{ param($p)\n"
        "        $d = Split-Path -Parent $p; if (-not (Test-Path $d)) {{ New-Item -ItemType Directory -Path $d | Out-Null }} }}\n"
        "    Copy-Item -ToSession $s -Path $a.src -Destination $a.dest -Force\n"
        "    $h = Invoke-Command -Session $s -ArgumentList $a.dest -ScriptBlock {{ param($p)\n"
        "        (Get-FileHash -Algorithm SHA256 -Path $p).Hash.ToLower() }}\n"
        "}} finally {{ Remove-PSSession $s }}\n"
        'if ($h -ne $a.sha256) {{ throw "copy of $($a.src) into $($a.vm) came out as $h" }}\n'
        "@{{ sha256 = $h }} | ConvertTo-Json -Compress\n"
    )
)


class PowerShellRunner:
    """Runs testbed's fixed scripts on a Windows host; subclasses deliver the command line."""

    name = "powershell"
    line_bytes = 48 * 1024  # raw bytes per stdin line of an upload (64 KiB of base64)

    def execute(self, argv: list[str], stdin: Iterable[bytes] = ()) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of ``powershell ... -EncodedCommand B64`` on the host,
        with ``stdin`` (lines, CR LF terminated) fed to it."""
        raise NotImplementedError

    def _checked(self, argv: list[str], stdin: Iterable[bytes] = ()) -> str:
        length = len(" ".join(argv))
        if length > CMD_LIMIT:
            raise ValueError(f"script too long for one command line ({length} > {CMD_LIMIT}): upload it")
        rc, stdout, stderr = self.execute(argv, stdin)
        try:
            records = error_messages(stderr)
        except ClixmlError as e:
            raise PowerShellError(f"{self.name}: {e}", rc, []) from None
        if rc != 0 or records:
            msg = "; ".join(records) or f"exit code {rc}"
            raise PowerShellError(f"{self.name}: {msg}", rc, records)
        return stdout

    def run(self, script: str, stdin: Iterable[bytes] = ()) -> str:
        """Run a script; returns stdout. Raises PowerShellError or TransportError."""
        return self._checked(encoded_argv(script), stdin)

    def run_json(self, template: str, args: dict[str, Any], stdin: Iterable[bytes] = ()) -> Any:
        out = self.run(template.format(b64=b64json(args)), stdin).strip()
        try:
            return json.loads(out) if out else None
        except ValueError:
            raise PowerShellError(f"{self.name}: output is not JSON: {out[:200]!r}", 0, []) from None

    def invoke(self, module: str, function: str, params: dict[str, Any]) -> Any:
        """Call a function of an uploaded module with named parameters (as data)."""
        if not FUNCTION.match(function):
            raise ValueError(f"not a Testbed module function name: {function!r}")
        return self.run_json(CALL, {"module": module, "function": function, "params": params})

    def file_sha256(self, remote_path: str) -> str:
        return str(self.run_json(FILE_HASH, {"path": remote_path})["sha256"])

    def upload(self, data: bytes, remote_path: str) -> bool:
        """Put a file on the host; skipped when the host's copy has the same sha256, and
        the host checks the hash before the file takes its name."""
        want = hashlib.sha256(data).hexdigest()
        if self.file_sha256(remote_path) == want:
            return False
        got = self._transfer(data, remote_path, want)
        if got != want:
            raise TransportError(f"{self.name}: upload of {remote_path} came out as {got}")
        log.info("%s: uploaded %s (%d bytes)", self.name, remote_path, len(data))
        return True

    def _transfer(self, data: bytes, remote_path: str, sha256: str) -> str:
        """Stream the file as base64 lines on stdin; returns the sha256 the host saw."""
        n = self.line_bytes
        # An empty file is one empty line: stdin must still end, or the host waits for it.
        lines = [base64.b64encode(data[i : i + n]) + b"\r\n" for i in range(0, len(data), n)] or [b"\r\n"]
        return str(
            self.run_json(STREAM_UPLOAD, {"path": remote_path, "sha256": sha256}, stdin=lines)["sha256"]
        )

    def close(self) -> None:
        pass


class LocalPowerShell(PowerShellRunner):
    """testbed running on the Hyper-V host itself: ``powershell.exe`` (5.1) or ``pwsh``."""

    def __init__(self, exe: str | None = None) -> None:
        found = exe or shutil.which("powershell") or shutil.which("pwsh")
        if not found:
            raise TransportError("no powershell or pwsh on PATH: the local Hyper-V route needs Windows")
        self.exe = found
        self.name = f"local {os.path.basename(found)}"

    def execute(self, argv: list[str], stdin: Iterable[bytes] = ()) -> tuple[int, str, str]:
        try:
            p = subprocess.run([self.exe, *argv[1:]], input=b"".join(stdin), capture_output=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TransportError(f"{self.name}: {e}") from None
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


class SshPowerShell(PowerShellRunner):
    """A Windows host with OpenSSH (as LISA reaches its Hyper-V hosts): the same scripts
    as an SSH exec of ``powershell -EncodedCommand`` (base64 needs no quoting)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.name = f"{transport.name} (powershell)"

    def execute(self, argv: list[str], stdin: Iterable[bytes] = ()) -> tuple[int, str, str]:
        r = self.transport.run(argv, input=b"".join(stdin) or None, timeout=900)
        return r.rc, r.stdout, r.stderr

    def close(self) -> None:
        self.transport.close()


class PowerShellDirect(PowerShellRunner):
    """Nested Hyper-V: scripts run inside the L1 VM through ``Invoke-Command -VMName``
    on the L0 host, so the L2 VM is driven with no network path into L1. Files go to
    L0 first and are copied in over a PowerShell Direct session."""

    def __init__(self, outer: PowerShellRunner, vm: str, user: str, password: str, staging_dir: str) -> None:
        self.outer = outer
        self.vm, self.user = vm, user
        self._password = password
        self.staging_dir = staging_dir
        self.name = f"{outer.name} -> VM {vm}"

    def _args(self, **kw: Any) -> dict[str, Any]:
        return {"vm": self.vm, "user": self.user, **kw}

    def _password_line(self) -> list[bytes]:
        return [self._password.encode("utf-8") + b"\r\n"]

    def run(self, script: str, stdin: Iterable[bytes] = ()) -> str:
        if stdin != ():
            raise ValueError("PowerShell Direct carries no stdin: stage the data on L0 (upload does)")
        return self.outer.run(IN_VM.format(b64=b64json(self._args(script=script))), self._password_line())

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until PowerShell Direct accepts a session. L1's heartbeat is OK before its
        sign-in stack is (first-boot specialisation, services still starting), so the first
        calls may be refused for a while. Only this no-op probe is retried (each retry
        logged); a real call is never sent twice."""
        retrying = Retrying(
            retry=retry_if_exception_type(PowerShellError),
            stop=stop_after_delay(timeout_s),
            wait=wait_fixed(PS_DIRECT_POLL_S),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        try:
            out = retrying(self.run, READY_PROBE).strip()
        except PowerShellError as e:
            raise PowerShellError(
                f"{self.name}: PowerShell Direct refused for {timeout_s:.0f} s: {e} (check nested.user and the "
                "password variable, and that the L1 image finishes its first boot)",
                e.exit_code,
                e.records,
            ) from None
        if out != "testbed-ready":
            raise PowerShellError(f"{self.name}: the readiness probe answered {out[:80]!r}", 0, [])

    def copy_in(self, src_on_outer: str, remote_path: str, sha256: str) -> str:
        """Copy a file that is on L0 into the VM (skipped when the VM's copy has the hash),
        hashed again inside; returns the sha256 the VM saw."""
        if self.file_sha256(remote_path) == sha256:
            return sha256
        return self._copy(src_on_outer, remote_path, sha256)

    def _copy(self, src_on_outer: str, remote_path: str, sha256: str) -> str:
        args = self._args(src=src_on_outer, dest=remote_path, sha256=sha256)
        return str(self.outer.run_json(COPY_TO_VM, args, self._password_line())["sha256"])

    def _transfer(self, data: bytes, remote_path: str, sha256: str) -> str:
        """Stage the file on L0 (by hash), then copy it into the VM, where it is hashed again."""
        staged = rf"{self.staging_dir}\{sha256}"
        self.outer.upload(data, staged)
        return self._copy(staged, remote_path, sha256)

    def close(self) -> None:
        self.outer.close()
