"""A WS-Management stand-in for the tests: real HTTP(S), the SOAP shell protocol pywinrm
speaks (Create, Command, Receive, Signal, Delete, SOAP faults), Basic auth or NTLM with
WinRM message encryption (pyspnego as the acceptor, MS-WSMV 2.2.9.1.1), and cmd.exe's
8191 character limit. It decodes ``powershell -EncodedCommand`` and answers only the
fixed scripts of testbed.transport.powershell, from an emulated host (files and the
Testbed module's functions) that answers as Windows PowerShell 5.1 would (one-element
arrays unwrapped, dates as \\/Date(ms)\\/); anything else is an error, as PowerShell
would give one. As Windows does, it hands a command's stdin to its console, where
``$input`` never sees it, unless the command was started with WINRS_CONSOLEMODE_STDIN
FALSE; it writes each shell's streams in the shell's code page (WINRS_CODEPAGE, else
the host's OEM one); under a Group Policy execution policy, ``Set-ExecutionPolicy
-Scope Process`` writes its ExecutionPolicyOverride record. ``serve_unix`` offers the
same host to a fake ``powershell`` executable (for an SSH server's PATH, or run
locally) that writes in the host's OEM code page.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fnmatch
import functools
import hashlib
import json
import os
import re
import socket
import socketserver
import ssl
import struct
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hyperv_emulator import binding_error, function_parameters  # type: ignore[import-not-found]

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}
ACT = {
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create": "create",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command": "command",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive": "receive",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal": "signal",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Send": "send",
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete": "delete",
}
CMD_LIMIT = 8191
B64 = re.compile(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)")
POLICY = re.compile(r"-executionpolicy\s+(\S+)", re.I)
# The short script that runs a long one sent on stdin: the script's base64 lines joined.
STDIN_SCRIPT = re.compile(r"FromBase64String\(\s*-join\s+\$l\[1\.\.\$n\]\s*\)")
# Set-ExecutionPolicy -Scope Process under a Group Policy: the cmdlet sets it, sees that the
# effective policy is still the GPO's, and throws a statement-terminating error record.
POLICY_OVERRIDE_ID = "ExecutionPolicyOverride,Microsoft.PowerShell.Commands.SetExecutionPolicyCommand"
POLICY_OVERRIDE = ("Set-ExecutionPolicy : Windows PowerShell updated your execution policy successfully, but the "
                   "setting is overridden by a policy defined at a more specific scope. Due to the override, your "
                   "shell will retain its current effective execution policy of {policy}.")  # fmt: skip
# try { Set-ExecutionPolicy ... } catch { if ($_.FullyQualifiedErrorId -notlike 'PATTERN') { throw } }
TOLERATED = re.compile(
    r"try\s*\{\s*Set-ExecutionPolicy[^}]*\}\s*catch\s*\{\s*if\s*\(\s*\$_\.FullyQualifiedErrorId\s+-notlike\s+"
    r"'([^']+)'\s*\)\s*\{\s*throw\s*\}\s*\}",
    re.I,
)
# .NET Framework 4.x: the assembly each namespace's types live in (what Add-Type must
# reference). Windows PowerShell 5.1's Add-Type references only these by default.
NAMESPACE_ASSEMBLY = {
    "System": "System", "System.Collections": "mscorlib", "System.Collections.Generic": "mscorlib",
    "System.Diagnostics": "System", "System.IO": "mscorlib", "System.Text.RegularExpressions": "System", "System.IO.Pipes": "System.Core",
    "System.Linq": "System.Core", "System.Text": "mscorlib", "System.Threading": "mscorlib",
    "System.Threading.Tasks": "mscorlib", "System.Runtime.InteropServices": "mscorlib",
    "System.Management": "System.Management", "System.Net.Http": "System.Net.Http",
    "System.Xml.Linq": "System.Xml.Linq", "System.Management.Automation": "System.Management.Automation",
}  # fmt: skip
ADD_TYPE_DEFAULT = {"mscorlib", "System", "System.Management.Automation"}


@functools.lru_cache(maxsize=8)
def _parameters(module: bytes) -> dict[str, dict[str, tuple[str, ...] | None]]:
    return function_parameters(module.decode(errors="replace"))  # type: ignore[no-any-return]


def parse_errors(script: str) -> list[str]:
    """What PowerShell's parser would refuse (tree-sitter-powershell's grammar)."""
    import tree_sitter as ts
    import tree_sitter_powershell as tsp

    tree = ts.Parser(ts.Language(tsp.language())).parse(script.encode())
    out: list[str] = []

    def walk(n: Any) -> None:
        if n.type == "ERROR" or n.is_missing:
            out.append(f"line {n.start_point[0] + 1}: {script.encode()[n.start_byte : n.end_byte][:60]!r}")
        for c in n.children:
            walk(c)

    if tree.root_node.has_error:
        walk(tree.root_node)
    return out or (["the script does not parse"] if tree.root_node.has_error else [])


def add_type_problems(source: str) -> list[str]:
    """Add-Type calls whose C# ``using`` lines need an assembly they do not reference:
    CS0234 on .NET Framework, as Windows PowerShell 5.1 would report it."""
    problems = []
    for m in re.finditer(r"Add-Type(?P<args>[^@]*)-TypeDefinition\s+@'\n(?P<cs>.*?)\n'@", source, re.S):
        refs = set(ADD_TYPE_DEFAULT)
        r = re.search(r"-ReferencedAssemblies\s+([\w., ]+?)(?:\s+-|$)", m.group("args"))
        if r:
            refs |= {x.strip() for x in r.group(1).split(",")}
        for ns in re.findall(r"^using\s+([\w.]+)\s*;", m.group("cs"), re.M):
            need = NAMESPACE_ASSEMBLY.get(ns)
            if need and need not in refs:
                outer, _, last = ns.rpartition(".")
                problems.append(f"error CS0234: The type or namespace name '{last}' does not exist in the namespace "
                                f"'{outer}' (are you missing an assembly reference?)")  # fmt: skip
    return problems


def clixml_error(message: str) -> str:
    esc = message.replace("\r", "_x000D_").replace("\n", "_x000A_")
    return ('#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
            f'<S S="Error">{esc}_x000D__x000A_</S></Objs>')  # fmt: skip


def codec(codepage: int) -> str:
    """Python's name for a Windows code page (65001 is UTF-8)."""
    return "utf-8" if codepage == 65001 else f"cp{codepage}"


def ps51_json(obj: Any) -> str:
    """ConvertTo-Json as Windows PowerShell 5.1 writes it: dates as \\/Date(ms)\\/, and a
    one-element array written by a function's pipeline comes out as the element."""

    def conv(o: Any) -> Any:
        if isinstance(o, dt.datetime):
            return f"/Date({int(o.timestamp() * 1000)})/"
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, list):
            return [conv(v) for v in o]
        return o

    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    return json.dumps(conv(obj), separators=(",", ":")).replace("/Date(", "\\/Date(").replace(")/", ")\\/")


@dataclass
class EmulatedHost:
    """What the stand-in's PowerShell can see: files and the Testbed module's functions,
    and for nested Hyper-V the VMs reachable with PowerShell Direct."""

    files: dict[str, bytes] = field(default_factory=dict)
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    max_command_seen: int = 0
    vms: dict[str, tuple[str, str, EmulatedHost]] = field(
        default_factory=dict
    )  # name -> user, password, host
    scripts_seen: list[str] = field(default_factory=list)
    stdin_uploads: int = 0
    execution_policy: str = "RemoteSigned"  # the machine's (a client SKU: Restricted)
    gpo_policy: str | None = None  # set by Group Policy: wins over the command line and every scope
    set_policy_error: tuple[str, str] | None = (
        None  # (FullyQualifiedErrorId, message): Set-ExecutionPolicy fails so
    )
    oem_codepage: int = 437  # what powershell.exe writes to a redirected stdout (the SSH and local routes)
    stdin_stall_s: float = 0.0  # the fake powershell takes this long before it reads an upload's stdin
    stdin_seen: list[bytes] = field(default_factory=list)  # what each script's $input carried
    compiles_add_type: set[str] = field(default_factory=lambda: {"Invoke-TestbedRace"})  # who calls Add-Type
    direct_not_ready: dict[str, int] = field(default_factory=dict)  # VM -> PowerShell Direct refusals left

    def _direct_refusal(self, a: dict[str, Any], stdin: bytes) -> str:
        """What PowerShell Direct answers before a session exists ('' when it opens one).
        The password is read from stdin, as the script does with $input; a VM still
        finishing its first boot refuses ``direct_not_ready[vm]`` more sessions."""
        target = self.vms.get(a["vm"])
        if target is None:
            return f"Invoke-Command : The virtual machine {a['vm']} is not running."
        password = stdin.split(b"\r\n", 1)[0].decode() if stdin else ""
        if not password:  # ConvertTo-SecureString of $null
            return ("ConvertTo-SecureString : Cannot bind argument to parameter 'String' because it is an "
                    "empty string.")  # fmt: skip
        if self.direct_not_ready.get(a["vm"], 0) > 0:
            self.direct_not_ready[a["vm"]] -= 1
            return (f"New-PSSession : [{a['vm']}] An error has occurred which Windows PowerShell cannot handle. "
                    "A remote session might have ended.")  # fmt: skip
        if (a["user"], password) != target[:2]:
            return "Invoke-Command : The credential is invalid."
        return ""

    def _from_stdin(self, script: str, stdin: bytes, policy: str | None) -> tuple[int, str, str]:
        """The short script that reads a long one from stdin: its first line is the number
        of base64 lines of the script, the rest is piped into it (the caller's stdin)."""
        self.stdin_seen.append(stdin)
        lines = stdin.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines = lines[:-1]
        if not lines or not lines[0].strip().isdigit():
            return 1, "", clixml_error('Cannot convert value "" to type "System.Int32".')
        n = int(lines[0])
        inner = base64.b64decode(b"".join(lines[1 : n + 1])).decode("utf-8")
        rest = b"".join(x + b"\r\n" for x in lines[n + 1 :])
        return self.powershell(inner, rest, policy)

    def _set_policy_records(self, script: str) -> list[tuple[str, str]]:
        """The error records ``Set-ExecutionPolicy -Scope Process`` writes on this host."""
        if self.set_policy_error is not None:
            return [self.set_policy_error]
        if self.gpo_policy and self.gpo_policy.lower() != "bypass":
            return [(POLICY_OVERRIDE_ID, POLICY_OVERRIDE.format(policy=self.gpo_policy))]
        return []

    @staticmethod
    def _tolerated(script: str, fqid: str) -> bool:
        """Caught by the script's own try/catch, which rethrows whatever its -notlike pattern
        does not match (PowerShell's wildcard match, case-insensitive)."""
        m = TOLERATED.search(script)
        return m is not None and fnmatch.fnmatchcase(fqid.lower(), m.group(1).lower())

    def powershell(self, script: str, stdin: bytes = b"", policy: str | None = None) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of one of testbed's fixed scripts, with its stdin;
        ``policy`` is the process's -ExecutionPolicy, when the command line gave one."""
        self.scripts_seen.append(script)
        bad = parse_errors(script)
        if bad:  # as powershell.exe: a ParserError before anything runs
            return 1, "", clixml_error("ParserError: " + "; ".join(bad))
        if script.strip() == "'testbed-ready'":  # PowerShell Direct's readiness probe
            return 0, "testbed-ready\r\n", ""
        if script.strip() == "[Console]::OutputEncoding.CodePage":
            return 0, f"{self.oem_codepage}\r\n", ""
        if STDIN_SCRIPT.search(script):
            return self._from_stdin(script, stdin, policy)
        self.stdin_seen.append(stdin)
        m = B64.search(script)
        if not m:
            return 1, "", clixml_error(f"stand-in: unrecognised script: {script[:80]!r}")
        a = json.loads(base64.b64decode(m.group(1)))
        if "Invoke-Command -VMName $a.vm" in script or "Copy-Item -ToSession $s" in script:
            refused = self._direct_refusal(a, stdin)
            if refused:
                return 1, "", clixml_error(refused)
        if "Invoke-Command -VMName $a.vm" in script:
            return self.vms[a["vm"]][2].powershell(a["script"])  # a remote session: L1's own machine policy
        if "Import-Module -Force $a.module" in script:
            before = script.split("Import-Module")[0]
            records = []
            if "Set-ExecutionPolicy -Scope Process -ExecutionPolicy Bypass" in before:
                records = self._set_policy_records(before)
                if not records or records[0][0] == POLICY_OVERRIDE_ID:  # else it failed: nothing was set
                    policy = "Bypass"
            if self.gpo_policy:  # Group Policy wins over -ExecutionPolicy and the Process scope
                policy = self.gpo_policy
            untolerated = [msg for fqid, msg in records if not self._tolerated(before, fqid)]
            if untolerated:  # each error record fails the call; the script went on, so did the import
                return 0, "", clixml_error("; ".join(untolerated))
            if (policy or self.execution_policy).lower() in ("restricted", "allsigned"):
                return 1, "", clixml_error(
                    f"Import-Module : File {a['module']} cannot be loaded because running scripts is disabled on "
                    "this system. For more information, see about_Execution_Policies.")  # fmt: skip
            if a["module"] not in self.files:
                return (
                    1,
                    "",
                    clixml_error(f"Import-Module : The specified module '{a['module']}' was not loaded"),
                )
            fn = self.functions.get(a["function"])
            if fn is None:
                return (
                    1,
                    "",
                    clixml_error(f"The term '{a['function']}' is not recognized as a name of a cmdlet"),
                )
            if a["function"] in self.compiles_add_type and (
                a["params"].get("Com1Pipe") or a["params"].get("Com3Pipe")
            ):
                problems = add_type_problems(self.files[a["module"]].decode(errors="replace"))
                if problems:
                    return 1, "", clixml_error("Add-Type : " + " ".join(problems))
            declared = _parameters(self.files[a["module"]]).get(a["function"])
            if declared is None:  # the uploaded module does not define it
                return (
                    1,
                    "",
                    clixml_error(f"The term '{a['function']}' is not recognized as a name of a cmdlet"),
                )
            refusal = binding_error(declared, a["params"])
            if refusal:  # ParameterBindingException: the function never runs
                return 1, "", clixml_error(f"{a['function']} : {refusal}")
            self.calls.append((a["function"], a["params"]))
            try:
                return 0, ps51_json(fn(**a["params"])), ""
            except Exception as e:  # the emulated cmdlet threw: a terminating error record
                return 1, "", clixml_error(str(e))
        if "process {" in script and "[IO.File]::Create($a.path + '.part')" in script:  # upload on stdin
            self.stdin_uploads += 1
            data = b"".join(base64.b64decode(line) for line in stdin.split(b"\r\n") if line)
            h = hashlib.sha256(data).hexdigest()
            if h != a["sha256"]:
                return 1, "", clixml_error(f"upload of {a['path']} corrupted: {h}")
            self.files[a["path"]] = data
            return 0, json.dumps({"sha256": h}), ""
        if "Copy-Item -ToSession $s" in script:  # into a VM over PowerShell Direct
            target = self.vms[a["vm"]]
            if a["src"] not in self.files:
                return 1, "", clixml_error(f"Copy-Item : Cannot find path '{a['src']}'")
            target[2].files[a["dest"]] = self.files[a["src"]]
            return 0, json.dumps({"sha256": hashlib.sha256(self.files[a["src"]]).hexdigest()}), ""
        if "Get-FileHash" in script and "Test-Path $a.path" in script:
            f = self.files.get(a["path"])
            return 0, json.dumps({"sha256": hashlib.sha256(f).hexdigest() if f is not None else ""}), ""
        return 1, "", clixml_error("stand-in: unrecognised script")


@dataclass
class Faults:
    """Failures to inject on demand."""

    unauthorized: bool = False
    drop_receive: bool = False
    malformed_clixml: bool = False
    drop_on: str | None = None  # drop the connection when receiving this module function's output
    malformed_on: str | None = None  # answer this module function with broken CLIXML


BOUNDARY = b"--Encrypted Boundary"
SPNEGO_ENC = "application/HTTP-SPNEGO-session-encrypted"


class StandIn:
    """``auth``: "basic", or "ntlm" (NTLM through Negotiate, with message encryption on
    plain HTTP as Windows requires; the acceptor reads NTLM_USER_FILE). ``tls``: serve
    HTTPS with this server context."""

    def __init__(self, host: EmulatedHost, user: str = "tester", password: str = "s3cret pass",
                 auth: str = "basic", tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.host = host
        self.user, self.password = user, password
        self.auth = auth
        self.tls = tls
        self.faults = Faults()
        self.shells: set[str] = set()
        self.commands: dict[str, tuple[int, str, str]] = {}
        self.requests: list[str] = []
        self.encrypted_requests = 0
        self.command_fn: dict[str, str] = {}
        self.pending: dict[str, tuple[str, bytearray]] = {}  # commands waiting for their stdin
        self.policies: dict[str, str | None] = {}  # each command's -ExecutionPolicy
        self.console_mode: dict[str, bool] = {}  # each command's WINRS_CONSOLEMODE_STDIN
        self.shell_codepage: dict[str, int] = {}  # each shell's WINRS_CODEPAGE
        self.sends = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/wsman"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # NTLM authenticates the connection, so keep it
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls
            ntlm: Any = None
            ntlm_done = False

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def deny(self) -> None:
                scheme = "Negotiate" if standin.auth == "ntlm" else 'Basic realm="WSMAN"'
                self.reply(401, b"", {"WWW-Authenticate": scheme})

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if standin.faults.unauthorized:
                    return self.deny()
                if standin.auth == "basic":
                    expected = (
                        "Basic " + base64.b64encode(f"{standin.user}:{standin.password}".encode()).decode()
                    )
                    if self.headers.get("Authorization") != expected:
                        return self.deny()
                    return self.soap(body.decode(), encrypt=False)
                return self.ntlm_post(body)

            def ntlm_post(self, body: bytes) -> None:
                import spnego

                header = self.headers.get("Authorization", "")
                if header.startswith("Negotiate "):
                    token = base64.b64decode(header.split(" ", 1)[1])
                    if self.ntlm is None or token[8:12] == b"\x01\x00\x00\x00":  # NEGOTIATE_MESSAGE
                        self.ntlm = spnego.server(protocol="ntlm")
                    try:
                        out = self.ntlm.step(token)
                    except Exception:  # wrong password: the acceptor refuses the AUTHENTICATE_MESSAGE
                        self.ntlm = None
                        return self.deny()
                    if not self.ntlm.complete:
                        return self.reply(
                            401,
                            b"",
                            {"WWW-Authenticate": "Negotiate " + base64.b64encode(out or b"").decode()},
                        )
                    self.ntlm_done = True
                if not self.ntlm_done:
                    return self.deny()
                if not body:  # pywinrm's empty request that sets the security context up
                    return self.reply(200, b"", {})
                ctype = self.headers.get("Content-Type", "")
                if SPNEGO_ENC not in ctype:
                    # Windows refuses unencrypted SOAP over HTTP with AllowUnencrypted=false.
                    return self.reply(500, b"unencrypted", {"Content-Type": "text/plain"})
                standin.encrypted_requests += 1
                parts = [x for x in body.split(BOUNDARY + b"\r\n") if x]
                length = int(parts[0].split(b"Length=")[1].strip())
                payload = parts[1].removeprefix(b"\tContent-Type: application/octet-stream\r\n")
                payload = payload.removesuffix(BOUNDARY + b"--\r\n")
                sig_len = struct.unpack("<i", payload[:4])[0]
                plain = self.ntlm.unwrap(payload[4 : 4 + sig_len] + payload[4 + sig_len :]).data
                assert len(plain) == length, "OriginalContent length does not match"
                self.soap(plain.decode(), encrypt=True)

            def soap(self, text: str, encrypt: bool) -> None:
                status, reply = standin.handle(text)
                if reply is None:  # a dropped connection mid-receive
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = reply.encode()
                if not encrypt:
                    return self.reply(status, data, {"Content-Type": "application/soap+xml;charset=UTF-8"})
                wrapped = self.ntlm.wrap(data, encrypt=True).data
                stream = struct.pack("<i", 16) + wrapped[:16] + wrapped[16:]
                body = (BOUNDARY + b"\r\n\tContent-Type: " + SPNEGO_ENC.encode() + b"\r\n"
                        b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=" + str(len(data)).encode()
                        + b"\r\n" + BOUNDARY + b"\r\n\tContent-Type: application/octet-stream\r\n" + stream
                        + BOUNDARY + b"--\r\n")  # fmt: skip
                ctype = f'multipart/encrypted;protocol="{SPNEGO_ENC}";boundary="Encrypted Boundary"'
                self.reply(status, body, {"Content-Type": ctype})

        return Handler

    def envelope(self, relates_to: str, body: str) -> str:
        return (f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" xmlns:rsp="{NS["rsp"]}">'
                f"<s:Header><a:RelatesTo>{relates_to}</a:RelatesTo><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
                f"</s:Header><s:Body>{body}</s:Body></s:Envelope>")  # fmt: skip

    def fault(self, relates_to: str, code: int, text: str) -> tuple[int, str]:
        return 500, self.envelope(relates_to, (
            f'<s:Fault><s:Code><s:Value>s:Receiver</s:Value></s:Code><s:Reason><s:Text xml:lang="en-US">{text}'
            f'</s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" '
            f'Code="{code}" Machine="standin"><f:Message>{text}</f:Message></f:WSManFault></s:Detail></s:Fault>'))  # fmt: skip

    def handle(self, text: str) -> tuple[int, str | None]:
        root = ET.fromstring(text)
        action = ACT.get(root.findtext("s:Header/a:Action", "", NS), "")
        msg_id = root.findtext("s:Header/a:MessageID", "", NS)
        shell = root.findtext(".//w:SelectorSet/w:Selector[@Name='ShellId']", "", NS)
        self.requests.append(action)
        if action == "create":
            sid = str(uuid.uuid4()).upper()
            self.shells.add(sid)
            cp = root.findtext(".//w:OptionSet/w:Option[@Name='WINRS_CODEPAGE']", "", NS).strip()
            self.shell_codepage[sid] = int(cp) if cp.isdigit() else self.host.oem_codepage
            return 200, self.envelope(msg_id, (
                f'<x:ResourceCreated xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer"><a:ReferenceParameters>'
                f'<w:SelectorSet><w:Selector Name="ShellId">{sid}</w:Selector></w:SelectorSet>'
                f'</a:ReferenceParameters></x:ResourceCreated>'))  # fmt: skip
        if shell not in self.shells:
            return self.fault(msg_id, 2150858843, (
                f"The request for the Windows Remote Shell with ShellId {shell} failed because the shell was not "
                "found on the server. Possible causes are: the specified ShellId is incorrect or the shell no "
                "longer exists on the server."))  # fmt: skip
        if action == "command":
            cmd = root.findtext(".//rsp:CommandLine/rsp:Command", "", NS).strip('"')
            args = " ".join(a.text or "" for a in root.findall(".//rsp:CommandLine/rsp:Arguments", NS))
            line = f"{cmd} {args}".strip()
            self.host.max_command_seen = max(self.host.max_command_seen, len(line))
            cid = str(uuid.uuid4()).upper()
            # pywinrm's default is TRUE: stdin then goes to the process's console input, not
            # to a pipe, and powershell.exe's $input sees none of it (Ansible streams a file
            # with FALSE for that reason).
            mode = root.findtext(".//w:OptionSet/w:Option[@Name='WINRS_CONSOLEMODE_STDIN']", "TRUE", NS)
            self.console_mode[cid] = mode.strip().upper() != "FALSE"
            if len(line) > CMD_LIMIT:
                self.commands[cid] = (1, "", "The command line is too long.\r\n")
            else:
                m = re.search(r"-encodedcommand\s+(\S+)", line, re.I)
                if not m:
                    self.commands[cid] = (
                        1,
                        "",
                        f"'{cmd}' is not recognized as an internal or external command\r\n",
                    )
                else:
                    script = base64.b64decode(m.group(1)).decode("utf-16-le")
                    pm = POLICY.search(line)
                    self.policies[cid] = pm.group(1) if pm else None
                    if "$input" in script:  # reads stdin: runs when the last Send arrives
                        self.pending[cid] = (script, bytearray())
                    else:
                        self.commands[cid] = self.host.powershell(script, policy=self.policies[cid])
                    m = B64.search(script)
                    if m:
                        self.command_fn[cid] = json.loads(base64.b64decode(m.group(1))).get("function", "")
            return 200, self.envelope(msg_id, f"<rsp:CommandResponse><rsp:CommandId>{cid}</rsp:CommandId>"
                                              "</rsp:CommandResponse>")  # fmt: skip
        if action == "receive":
            cid = root.find(".//rsp:DesiredStream", NS).get("CommandId", "")  # type: ignore[union-attr]
            fn = self.command_fn.pop(cid, None)
            if self.faults.drop_receive or (fn and fn == self.faults.drop_on):
                return 200, None
            rc, out, err = self.commands.pop(cid, (1, "", "no such command"))
            if self.faults.malformed_clixml or (fn and fn == self.faults.malformed_on):
                err, rc = '#< CLIXML\r\n<Objs><S S="Error">broken', 1
            enc = codec(self.shell_codepage.get(shell, self.host.oem_codepage))
            streams = "".join(
                f'<rsp:Stream Name="{n}" CommandId="{cid}">{base64.b64encode(v.encode(enc, "replace")).decode()}'
                "</rsp:Stream>"
                for n, v in (("stdout", out), ("stderr", err)) if v
            )  # fmt: skip
            return 200, self.envelope(msg_id, (
                f"<rsp:ReceiveResponse>{streams}<rsp:CommandState CommandId=\"{cid}\" "
                f'State="http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done">'
                f"<rsp:ExitCode>{rc}</rsp:ExitCode></rsp:CommandState></rsp:ReceiveResponse>"))  # fmt: skip
        if action == "send":
            stream = root.find(".//rsp:Send/rsp:Stream", NS)
            assert stream is not None
            cid = stream.get("CommandId", "")
            if cid not in self.pending:
                return self.fault(msg_id, 2150858843, "The request for the command is invalid")
            self.sends += 1
            self.pending[cid][1].extend(base64.b64decode(stream.text or ""))
            if stream.get("End") == "true":
                script, data = self.pending.pop(cid)
                piped = b"" if self.console_mode.get(cid, True) else bytes(data)
                self.commands[cid] = self.host.powershell(script, piped, self.policies.get(cid))
            return 200, self.envelope(msg_id, "<rsp:SendResponse/>")
        if action == "signal":
            return 200, self.envelope(msg_id, "<rsp:SignalResponse/>")
        if action == "delete":
            self.shells.discard(shell)
            return 200, self.envelope(msg_id, "")
        return self.fault(msg_id, 2150858771, f"unsupported action {action!r}")


@contextlib.contextmanager
def running(host: EmulatedHost, **kw: Any) -> Iterator[StandIn]:
    s = StandIn(host, **kw)
    s.thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()


# ---- the SSH route: a fake ``powershell`` on an SSH server's PATH ------------------------

FAKE_POWERSHELL = """#!{python}
# testbed's tests: powershell.exe as Windows OpenSSH would run it, answered by the
# emulated host of the test process over a Unix socket. Windows PowerShell 5.1 writes a
# redirected stdout and stderr in the console's output code page (the OEM one).
import base64, json, socket, sys, time
args = sys.argv[1:]
if len(" ".join(["powershell"] + args)) > 8191:
    sys.stderr.write("The command line is too long.\\r\\n"); sys.exit(1)
low = [a.lower() for a in args]
if "-encodedcommand" not in low:
    sys.stderr.write("fake powershell: only -EncodedCommand\\n"); sys.exit(1)
script = base64.b64decode(args[low.index("-encodedcommand") + 1]).decode("utf-16-le")
policy = args[low.index("-executionpolicy") + 1] if "-executionpolicy" in low else None
if "process {{" in script:  # an upload: a host slow to take its stdin
    time.sleep({stall!r})
s = socket.socket(socket.AF_UNIX)
s.connect({sock!r})
stdin = base64.b64encode(sys.stdin.buffer.read()).decode()
s.sendall(json.dumps({{"script": script, "stdin": stdin, "policy": policy}}).encode() + b"\\n")
r = json.loads(s.makefile().readline())
sys.stdout.buffer.write(r["stdout"].encode(r["codec"], "replace"))
sys.stderr.buffer.write(r["stderr"].encode(r["codec"], "replace"))
sys.exit(r["rc"])
"""


@contextlib.contextmanager
def serve_unix(host: EmulatedHost, directory: str) -> Iterator[str]:
    """The emulated host on a Unix socket, and a ``bin`` dir with a fake powershell for PATH."""
    import sys

    sock = os.path.join(directory, "powershell.sock")
    bindir = os.path.join(directory, "bin")
    os.makedirs(bindir, exist_ok=True)

    class H(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            rc, out, err = host.powershell(
                req["script"], base64.b64decode(req.get("stdin", "")), req.get("policy")
            )
            reply = {"rc": rc, "stdout": out, "stderr": err, "codec": codec(host.oem_codepage)}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    server = socketserver.ThreadingUnixStreamServer(sock, H)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    exe = os.path.join(bindir, "powershell")
    with open(exe, "w") as f:
        f.write(FAKE_POWERSHELL.format(python=sys.executable, sock=sock, stall=host.stdin_stall_s))
    os.chmod(exe, 0o755)
    try:
        yield bindir
    finally:
        server.shutdown()
        server.server_close()


def make_test_ca(directory: str) -> tuple[str, ssl.SSLContext]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (CA file, server context)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("testbed test CA")).issuer_name(name("testbed test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ca_file, ctx
