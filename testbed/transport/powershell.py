"""PowerShell on a Windows host, whichever way it is reached.

One runner class per route, sharing everything but how a command line gets to
the host: WinRM (testbed.transport.winrm), SSH to Windows OpenSSH, a local
``powershell.exe``/``pwsh``, and PowerShell Direct into a nested VM.

Scripts go as ``powershell -EncodedCommand`` (UTF-16LE, base64), which cmd.exe
limits to 8191 characters, so files (the module, artifacts) are streamed on stdin
as base64 lines and hash-checked on the host, and each call is a short fixed
script plus its parameters as base64 JSON: user values are data inside a single-quoted base64 literal, never
PowerShell syntax; a call too long for one command line goes on stdin to a short
fixed script instead. Results come back as JSON; error records (CLIXML on stderr)
and non-zero exits become typed errors with the host's message. Stdin is streamed
a line at a time, with a timeout per line, never held whole nor timed per file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_delay, wait_fixed

from testbed.transport.base import TransportError
from testbed.transport.clixml import ClixmlError, error_messages, output_codec

log = logging.getLogger(__name__)

PS_DIRECT_POLL_S = 5.0  # between PowerShell Direct readiness probes
CMD_LIMIT = 8191  # cmd.exe's command-line limit, which -EncodedCommand lives within
CHUNK_TIMEOUT_S = 120.0  # the host must take each stdin line (48 KiB of a file) within this
CALL_TIMEOUT_S = 900.0  # and answer within this once its stdin has ended
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
# Where Group Policy sets a policy, Set-ExecutionPolicy still sets the Process scope but
# then throws ExecutionPolicyOverride (the GPO's policy stays the effective one): that one
# error record, and no other, is expected there (RemoteSigned still loads a local module).
CALL = _ARGS + (
    "try {{ Set-ExecutionPolicy -Scope Process -ExecutionPolicy Bypass -Force -ErrorAction Stop }}\n"
    "catch {{ if ($_.FullyQualifiedErrorId -notlike 'ExecutionPolicyOverride,*') {{ throw }} }}\n"
    "Import-Module -Force $a.module\n"
    "$p = @{{}}; $a.params.psobject.Properties | ForEach-Object {{ $p[$_.Name] = $_.Value }}\n"
    "$r = & $a.function @p\n"
    "ConvertTo-Json -InputObject $r -Depth 8 -Compress\n"
)
# Answers with its own text: PowerShell Direct's readiness probe (runs inside L1).
READY_PROBE = "'testbed-ready'\n"
# The code page powershell.exe writes a redirected stdout and stderr in (digits only).
CODEPAGE_PROBE = "[Console]::OutputEncoding.CodePage\n"
# A script too long for the command line, sent on stdin: the first line is the number of
# base64 lines of the (UTF-8) script, then those lines, then the caller's own stdin, which
# is piped into the script (its $input, as if it had been started with it).
STDIN_SCRIPT = (
    "$l = @($input)\n"
    "$n = [int]$l[0]\n"
    "$s = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String(-join $l[1..$n]))\n"
    "@($l | Select-Object -Skip ($n + 1)) | & ([scriptblock]::Create($s))\n"
)
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
        with ``stdin`` (lines, CR LF terminated, read one at a time) fed to it."""
        raise NotImplementedError

    def _checked(self, argv: list[str], stdin: Iterable[bytes] = ()) -> str:
        length = len(" ".join(argv))
        if length > CMD_LIMIT:  # run() never builds one: a typed error, never a crash
            raise PowerShellError(f"{self.name}: a command line of {length} characters (cmd.exe takes {CMD_LIMIT})",
                                  0, [])  # fmt: skip
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
        """Run a script; returns stdout. Raises PowerShellError or TransportError. A script
        too long for cmd.exe's command line goes on stdin to STDIN_SCRIPT instead."""
        argv = encoded_argv(script)
        if len(" ".join(argv)) > CMD_LIMIT:
            log.debug("%s: a %d-character script goes on stdin", self.name, len(script))
            argv, stdin = encoded_argv(STDIN_SCRIPT), _script_on_stdin(script, stdin)
        return self._checked(argv, stdin)

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

    def upload(self, data: bytes | Path, remote_path: str, sha256: str | None = None) -> bool:
        """Put a file on the host (bytes, or a local file read as it is sent); skipped when
        the host's copy has the same sha256, and the host checks the hash before the file
        takes its name."""
        want = sha256 or sha256_of(data)
        if self.file_sha256(remote_path) == want:
            return False
        got = self._transfer(data, remote_path, want)
        if got != want:
            raise TransportError(f"{self.name}: upload of {remote_path} came out as {got}")
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        log.info("%s: uploaded %s (%d bytes)", self.name, remote_path, size)
        return True

    def _transfer(self, data: bytes | Path, remote_path: str, sha256: str) -> str:
        """Stream the file as base64 lines on stdin; returns the sha256 the host saw."""
        lines = _base64_lines(data, self.line_bytes)
        return str(
            self.run_json(STREAM_UPLOAD, {"path": remote_path, "sha256": sha256}, stdin=lines)["sha256"]
        )

    def close(self) -> None:
        pass


def sha256_of(data: bytes | Path) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(data, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _chunks(data: bytes | Path, n: int) -> Iterator[bytes]:
    if isinstance(data, bytes):
        yield from (data[i : i + n] for i in range(0, len(data), n))
        return
    with open(data, "rb") as f:
        while chunk := f.read(n):
            yield chunk


def _base64_lines(data: bytes | Path, n: int) -> Iterator[bytes]:
    """An empty file is one empty line: stdin must still end, or the host waits for it."""
    empty = True
    for chunk in _chunks(data, n):
        empty = False
        yield base64.b64encode(chunk) + b"\r\n"
    if empty:
        yield b"\r\n"


def _script_on_stdin(script: str, stdin: Iterable[bytes]) -> Iterator[bytes]:
    """STDIN_SCRIPT's input: the line count, the script's base64 lines, the caller's stdin."""
    b64 = base64.b64encode(script.encode("utf-8"))
    lines = [b64[i : i + 65536] for i in range(0, len(b64), 65536)]
    yield str(len(lines)).encode() + b"\r\n"
    yield from (line + b"\r\n" for line in lines)
    yield from stdin


class _Feeder(threading.Thread):
    """Writes stdin one line at a time, noting when each was taken."""

    def __init__(self, write: Callable[[bytes], Any], close: Callable[[], Any], lines: Iterable[bytes]) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.write, self.close, self.lines = write, close, lines
        self.sent, self.last = 0, time.monotonic()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for line in self.lines:
                try:
                    self.write(line)
                except OSError:  # the command stopped reading (it ended): its answer says why
                    return
                self.sent += 1
                self.last = time.monotonic()
            self.close()
        except BaseException as e:  # reading the local file failed: reported by feed()
            self.error = e


def feed(name: str, write: Callable[[bytes], Any], close: Callable[[], Any], lines: Iterable[bytes],
         chunk_timeout_s: float, abort: Callable[[], Any]) -> None:  # fmt: skip
    """Feed ``lines`` to a command; a line the host has not taken ``chunk_timeout_s`` after
    the one before aborts the command (a timeout per line, not per file)."""
    f = _Feeder(write, close, lines)
    f.start()
    while f.is_alive():
        f.join(0.05)
        if f.is_alive() and time.monotonic() - f.last > chunk_timeout_s:
            abort()
            f.join(5)
            raise TransportError(f"{name}: the host took no stdin for {chunk_timeout_s:.0f} s (line {f.sent + 1})")  # fmt: skip
    if f.error is not None:
        raise TransportError(f"{name}: reading what to send failed: {f.error}") from None


class _PipedPowerShell(PowerShellRunner):
    """A route where powershell.exe writes to a pipe (SSH, local), in its console's output
    code page: the OEM one (437, 850, ...) unless set. Asked once, then decoded with it
    (WinRM opens its shell with code page 65001, UTF-8)."""

    chunk_timeout_s = CHUNK_TIMEOUT_S
    timeout_s = CALL_TIMEOUT_S
    _codec: str | None = None

    def _raw(self, argv: list[str], stdin: Iterable[bytes]) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    def execute(self, argv: list[str], stdin: Iterable[bytes] = ()) -> tuple[int, str, str]:
        if self._codec is None:
            rc, out, _err = self._raw(encoded_argv(CODEPAGE_PROBE), ())
            page = out.decode("ascii", "replace").strip()
            self._codec = output_codec(page) if rc == 0 and page.isdigit() else "utf-8"
            log.debug("%s: output code page %s (%s)", self.name, page, self._codec)
        rc, out, err = self._raw(argv, stdin)
        return rc, out.decode(self._codec, "replace"), err.decode(self._codec, "replace")


class LocalPowerShell(_PipedPowerShell):
    """testbed running on the Hyper-V host itself: ``powershell.exe`` (5.1) or ``pwsh``."""

    def __init__(self, exe: str | None = None, *, chunk_timeout_s: float = CHUNK_TIMEOUT_S,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:  # fmt: skip
        found = exe or shutil.which("powershell") or shutil.which("pwsh")
        if not found:
            raise TransportError("no powershell or pwsh on PATH: the local Hyper-V route needs Windows")
        self.exe = found
        self.name = f"local {os.path.basename(found)}"
        self.chunk_timeout_s, self.timeout_s = chunk_timeout_s, timeout_s

    def _raw(self, argv: list[str], stdin: Iterable[bytes]) -> tuple[int, bytes, bytes]:
        try:
            p = subprocess.Popen([self.exe, *argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)  # fmt: skip
        except OSError as e:
            raise TransportError(f"{self.name}: {e}") from None
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [threading.Thread(target=lambda f=f, b=b: b.append(f.read()), daemon=True)
                   for f, b in ((p.stdout, out), (p.stderr, err))]  # fmt: skip
        for t in readers:
            t.start()
        try:
            stdin_pipe = p.stdin
            feed(self.name, lambda b: (stdin_pipe.write(b), stdin_pipe.flush()), stdin_pipe.close, stdin,
                 self.chunk_timeout_s, p.kill)  # fmt: skip
            rc = p.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{self.name}: no answer {self.timeout_s:.0f} s after its input") from None
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in readers:
            t.join()
        return rc, b"".join(out), b"".join(err)


class SshPowerShell(_PipedPowerShell):
    """A Windows host with OpenSSH (as LISA reaches its Hyper-V hosts): the same scripts
    as an SSH exec of ``powershell -EncodedCommand`` (base64 needs no quoting), on a
    channel of the transport's connection."""

    def __init__(self, transport: Any, *, chunk_timeout_s: float = CHUNK_TIMEOUT_S,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:  # fmt: skip
        self.transport = transport
        self.name = f"{transport.name} (powershell)"
        self.chunk_timeout_s, self.timeout_s = chunk_timeout_s, timeout_s

    def _raw(self, argv: list[str], stdin: Iterable[bytes]) -> tuple[int, bytes, bytes]:
        import paramiko

        try:
            t = self.transport.client.get_transport()
            chan = t.open_session()
            try:
                chan.exec_command(shlex.join(argv))
                feed(self.name, chan.sendall, chan.shutdown_write, stdin, self.chunk_timeout_s, chan.close)
                return _ssh_answer(self.name, chan, self.timeout_s)
            finally:
                chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{self.name}: connection lost: {e}") from None

    def close(self) -> None:
        self.transport.close()


def _ssh_answer(name: str, chan: Any, timeout_s: float) -> tuple[int, bytes, bytes]:
    """Both streams of an SSH channel until the command exits (buffered by paramiko while
    stdin was sent), within ``timeout_s``."""
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout_s
    while True:
        got = False
        while chan.recv_ready():
            out += chan.recv(65536)
            got = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            got = True
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        if time.monotonic() > deadline:
            raise TransportError(f"{name}: no answer {timeout_s:.0f} s after its input")
        if not got:
            time.sleep(0.01)
    return chan.recv_exit_status(), bytes(out), bytes(err)


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

    def _transfer(self, data: bytes | Path, remote_path: str, sha256: str) -> str:
        """Stage the file on L0 (by hash), then copy it into the VM, where it is hashed again."""
        staged = rf"{self.staging_dir}\{sha256}"
        self.outer.upload(data, staged, sha256)
        return self._copy(staged, remote_path, sha256)

    def close(self) -> None:
        self.outer.close()
