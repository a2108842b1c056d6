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
