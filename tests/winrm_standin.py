"""A WS-Management stand-in for the tests: real HTTP, the SOAP shell protocol pywinrm speaks
(Create, Command, Receive, Signal, Delete, SOAP faults), Basic auth, and cmd.exe's 8191
character limit. It decodes ``powershell -encodedcommand`` and answers only the fixed
scripts of testbed.transport.winrm, from an emulated host (a dict of files and
functions); anything else is an error, as PowerShell would give one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete": "delete",
}
CMD_LIMIT = 8191
B64 = re.compile(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)")


def clixml_error(message: str) -> str:
    esc = message.replace("\r", "_x000D_").replace("\n", "_x000A_")
    return ('#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
            f'<S S="Error">{esc}_x000D__x000A_</S></Objs>')  # fmt: skip


@dataclass
class EmulatedHost:
    """What the stand-in's PowerShell can see: files and the Testbed module's functions."""

    files: dict[str, bytes] = field(default_factory=dict)
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    max_command_seen: int = 0

    def powershell(self, script: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of one of testbed's fixed scripts."""
        m = B64.search(script)
        if not m:
            return 1, "", clixml_error(f"stand-in: unrecognised script: {script[:80]!r}")
        a = json.loads(base64.b64decode(m.group(1)))
        if "Import-Module -Force $a.module" in script:
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
            self.calls.append((a["function"], a["params"]))
            try:
                return 0, json.dumps(fn(**a["params"])), ""
            except Exception as e:  # the emulated cmdlet threw: a terminating error record
                return 1, "", clixml_error(str(e))
        if "[IO.FileMode]::Append" in script:
            old = b"" if a.get("first") else self.files.get(a["path"] + ".part", b"")
            self.files[a["path"] + ".part"] = old + base64.b64decode(a["data"])
            return 0, "", ""
        if "Move-Item" in script:
            data = self.files.pop(a["path"] + ".part", b"")
            h = hashlib.sha256(data).hexdigest()
            if h != a["sha256"]:
                return 1, "", clixml_error(f"upload of {a['path']} corrupted: {h}")
            self.files[a["path"]] = data
            return 0, json.dumps({"sha256": h}), ""
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


class StandIn:
    def __init__(self, host: EmulatedHost, user: str = "tester", password: str = "s3cret pass") -> None:
        self.host = host
        self.user, self.password = user, password
        self.faults = Faults()
        self.shells: set[str] = set()
        self.commands: dict[str, tuple[int, str, str]] = {}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/wsman"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = "Basic " + base64.b64encode(f"{standin.user}:{standin.password}".encode()).decode()
                if standin.faults.unauthorized or self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="WSMAN"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, reply = standin.handle(body.decode())
                if reply is None:  # a dropped connection mid-receive
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = reply.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def envelope(self, relates_to: str, body: str) -> str:
        return (f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" xmlns:rsp="{NS["rsp"]}">'
                f"<s:Header><a:RelatesTo>{relates_to}</a:RelatesTo><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
                f"</s:Header><s:Body>{body}</s:Body></s:Envelope>")  # fmt: skip

    def fault(self, relates_to: str, code: int, text: str) -> tuple[int, str]:
        return 500, self.envelope(relates_to, (
            f'<s:Fault><s:Code><s:Value>s:Receiver</s:Value></s:Code><s:Reason><s:Text xml:lang="en-US">{text}'
            f'</s:Text></s:Reason><s:Detail><w:WSManFault Code="{code}"/></s:Detail></s:Fault>'))  # fmt: skip

    def handle(self, text: str) -> tuple[int, str | None]:
        root = ET.fromstring(text)
        action = ACT.get(root.findtext("s:Header/a:Action", "", NS), "")
        msg_id = root.findtext("s:Header/a:MessageID", "", NS)
        shell = root.findtext(".//w:SelectorSet/w:Selector[@Name='ShellId']", "", NS)
        self.requests.append(action)
        if action == "create":
            sid = str(uuid.uuid4()).upper()
            self.shells.add(sid)
            return 200, self.envelope(msg_id, (
                f'<x:ResourceCreated xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer"><a:ReferenceParameters>'
                f'<w:SelectorSet><w:Selector Name="ShellId">{sid}</w:Selector></w:SelectorSet>'
                f'</a:ReferenceParameters></x:ResourceCreated>'))  # fmt: skip
        if shell not in self.shells:
            return self.fault(
                msg_id, 2150858843, "The request for the Windows Remote Shell with ShellId is invalid"
            )
        if action == "command":
            cmd = root.findtext(".//rsp:CommandLine/rsp:Command", "", NS).strip('"')
            args = " ".join(a.text or "" for a in root.findall(".//rsp:CommandLine/rsp:Arguments", NS))
            line = f"{cmd} {args}".strip()
            self.host.max_command_seen = max(self.host.max_command_seen, len(line))
            cid = str(uuid.uuid4()).upper()
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
                    self.commands[cid] = self.host.powershell(script)
            return 200, self.envelope(msg_id, f"<rsp:CommandResponse><rsp:CommandId>{cid}</rsp:CommandId>"
                                              "</rsp:CommandResponse>")  # fmt: skip
        if action == "receive":
            if self.faults.drop_receive:
                return 200, None
            cid = root.find(".//rsp:DesiredStream", NS).get("CommandId", "")  # type: ignore[union-attr]
            rc, out, err = self.commands.pop(cid, (1, "", "no such command"))
            if self.faults.malformed_clixml:
                err, rc = '#< CLIXML\r\n<Objs><S S="Error">broken', 1
            streams = "".join(
                f'<rsp:Stream Name="{n}" CommandId="{cid}">{base64.b64encode(v.encode()).decode()}</rsp:Stream>'
                for n, v in (("stdout", out), ("stderr", err)) if v
            )  # fmt: skip
            return 200, self.envelope(msg_id, (
                f"<rsp:ReceiveResponse>{streams}<rsp:CommandState CommandId=\"{cid}\" "
                f'State="http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done">'
                f"<rsp:ExitCode>{rc}</rsp:ExitCode></rsp:CommandState></rsp:ReceiveResponse>"))  # fmt: skip
        if action == "signal":
            return 200, self.envelope(msg_id, "<rsp:SignalResponse/>")
        if action == "delete":
            self.shells.discard(shell)
            return 200, self.envelope(msg_id, "")
        return self.fault(msg_id, 2150858771, f"unsupported action {action!r}")


@contextlib.contextmanager
def running(host: EmulatedHost) -> Iterator[StandIn]:
    s = StandIn(host)
    s.thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()
