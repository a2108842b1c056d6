"""Client side of the host agent: spawn it, send JSON-line requests, read replies."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from typing import IO, Any

log = logging.getLogger(__name__)


class AgentFailure(Exception):
    """The agent answered with an error (``kind`` says which)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class AgentLost(Exception):
    """The agent process or its channel is gone: an infrastructure failure."""


class AgentClient:
    """Talks to one agent over a pair of pipes (a local subprocess's, or an SSH
    exec channel's: the transport decides)."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self._in = stdin
        self._out = stdout
        self._ids = itertools.count(1)
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._lock = threading.Lock()

    def _read(self) -> None:
        for raw in self._out:
            try:
                self._replies.put(json.loads(raw))
            except ValueError:
                log.warning("agent printed a non-JSON line: %r", raw[:200])
        self._replies.put(None)

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        with self._lock:
            rid = next(self._ids)
            try:
                self._in.write((json.dumps({"id": rid, "op": op, "args": args}) + "\n").encode())
                self._in.flush()
            except (BrokenPipeError, ValueError, OSError) as e:
                raise AgentLost(f"agent channel closed while sending {op}: {e}") from None
            while True:
                try:
                    msg = self._replies.get(timeout=timeout)
                except queue.Empty:
                    raise AgentLost(f"agent did not answer {op} within {timeout:.0f} s") from None
                if msg is None:
                    self._replies.put(None)
                    raise AgentLost(f"agent exited during {op}")
                if msg.get("id") != rid:
                    continue
                if msg.get("ok"):
                    result: dict[str, Any] = msg.get("result", {})
                    return result
                if msg.get("trace"):
                    log.debug("agent trace: %s", msg["trace"])
                raise AgentFailure(str(msg.get("kind")), str(msg.get("error")))

    def close_input(self) -> None:
        """Close the agent's stdin: it destroys its VMs and exits."""
        try:
            self._in.close()
        except (OSError, EOFError):
            pass


class HostProgram:
    """A host-side RPC program (``testbed.hostprog.rpc``) reached through a transport:
    started on first use, as a local subprocess or, on a remote host, as a zipapp
    uploaded once (hash-checked, skipped when present); ended by closing its stdin.

    Shared by every backend whose host side is Python (the QEMU agent, the
    OpenVMM console driver), so each has one way to start, talk and stop."""

    def __init__(self, transport: Any, entry: str, *, hello_timeout: float = 60.0) -> None:
        self.transport = transport
        self.entry = entry
        self.hello_timeout = hello_timeout
        self.hello: dict[str, Any] = {}
        self._client: AgentClient | None = None
        self._close: Any = None

    @property
    def client(self) -> AgentClient:
        """The running program (started now if needed); AgentLost if it cannot start."""
        if self._client is None:
            if self.transport.is_local:
                import sys

                argv = [sys.executable, "-m", self.entry]
            else:
                from testbed.hostprog.bundle import build_pyz

                pyz = build_pyz(self.entry)
                remote = f".cache/testbed/agent/{pyz.name}"
                uploaded = self.transport.put(pyz, remote)
                log.info(
                    "%s: %s %s", self.transport.name, pyz.name, "uploaded" if uploaded else "already there"
                )
                argv = ["python3", remote]
            stdin, stdout, close = self.transport.open_agent(argv)
            self._client, self._close = AgentClient(stdin, stdout), close
            try:
                self.hello = self._client.call("hello", timeout=self.hello_timeout)
            except (AgentFailure, AgentLost) as e:
                self.close()
                raise AgentLost(f"{self.transport.name}: {self.entry} did not start: {e}") from None
        return self._client

    @property
    def running(self) -> bool:
        return self._client is not None

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """One request; a lost program is forgotten, so the next call starts a fresh one."""
        try:
            return self.client.call(op, timeout=timeout, **args)
        except AgentLost:
            self.close()
            raise

    def close(self) -> None:
        """Close the program's stdin: it destroys what it owns and exits."""
        if self._client is not None:
            self._client.close_input()
            if self._close is not None:
                self._close()
            self._client = None
