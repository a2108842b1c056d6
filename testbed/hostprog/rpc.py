"""The host agents' RPC loop: JSON lines on stdin/stdout, one request at a time,
and a dead-man switch (stdin closing ends every VM the agent owns).

Protocol: one request per line ``{"id": N, "op": "...", "args": {...}}``; one
reply per request ``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N,
"ok": false, "error": "...", "kind": "..."}``.  An op is a coroutine method
``op_<name>`` of the server.  Every host-side program of a backend (the QEMU
agent, the OpenVMM console driver) is an :class:`RpcServer` subclass, so they
share one client (``testbed.hostprog.client``) and one transport path.

Stdlib only, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import traceback
from typing import Any


class AgentError(Exception):
    """A failure an op reports to the client as ``kind`` + message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RpcServer:
    def __init__(self) -> None:
        self.loop = asyncio.get_event_loop()

    async def close_all(self) -> None:
        """Destroy everything this agent owns (its owner is gone, or it was told to stop)."""

    def reply(self, msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def serve(self) -> None:
        reader = asyncio.StreamReader(limit=1 << 24)
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        eof = asyncio.Event()

        async def read_stdin() -> None:
            while True:
                line = await reader.readline()
                if not line:
                    eof.set()
                    return
                try:
                    await queue.put(json.loads(line))
                except ValueError:
                    self.reply({"id": None, "ok": False, "kind": "protocol", "error": "bad json"})

        stdin_task = asyncio.ensure_future(read_stdin())
        eof_wait = asyncio.ensure_future(eof.wait())
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, eof_wait}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break  # dead-man switch: our owner is gone
                current = asyncio.ensure_future(self.handle(get.result()))
                # Watch stdin while the request runs, so EOF aborts a long wait.
                done, _ = await asyncio.wait({current, eof_wait}, return_when=asyncio.FIRST_COMPLETED)
                if current not in done:
                    current.cancel()
                    break
        finally:
            stdin_task.cancel()
            await self.close_all()

    async def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        op = req.get("op", "")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            self.reply({"id": rid, "ok": False, "kind": "protocol", "error": f"unknown op {op!r}"})
            return
        try:
            result = await fn(**req.get("args", {}))
            self.reply({"id": rid, "ok": True, "result": result})
        except AgentError as e:
            self.reply({"id": rid, "ok": False, "kind": e.kind, "error": str(e)})
        except Exception as e:  # reported, never swallowed
            self.reply(
                {
                    "id": rid,
                    "ok": False,
                    "kind": "internal",
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(),
                }
            )


def run(server_class: Any) -> None:
    """Run an RpcServer until stdin closes or SIGTERM/SIGHUP; clean up either way."""
    # A terminal Ctrl-C reaches the whole foreground group; the owner decides
    # when we stop (by closing our stdin), so ignore SIGINT here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = server_class()
    task = loop.create_task(server.serve())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGHUP, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)
    # A cancelled serve() skipped its finally only if cancelled before it began.
    loop.run_until_complete(server.close_all())
