"""Bare QEMU, no testbed in the path: the floor the benchmarks compare against."""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.agent.qemu import qemu_argv


class _Qmp:
    """One raw QMP connection: send a command, skip events until its reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rw")
        self.f.readline()  # greeting
        self("qmp_capabilities")

    def __call__(self, command: str) -> Any:
        self.f.write(json.dumps({"execute": command}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg.get("return")


def bare_cycle(spec: dict[str, Any], incoming: Path | None = None) -> float:
    """Launch -> READY (or restored and running) -> ACPI poweroff -> exit. Seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        argv = qemu_argv({**spec, "incoming": str(incoming) if incoming else None}, wd)
        t = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (wd / "qmp.sock").exists():
                time.sleep(0.002)
            # Connect the chardevs like any host would, so the guest's ports see a host.
            socks = []
            for port in ("vmbus", "get"):
                s = socket.socket(socket.AF_UNIX)
                while True:
                    try:
                        s.connect(str(wd / f"{port}.sock"))
                        break
                    except OSError:
                        time.sleep(0.002)
                socks.append(s)
            qmp = _Qmp(wd / "qmp.sock")
            if incoming:
                while (qmp("query-migrate") or {}).get("status") != "completed":
                    time.sleep(0.005)
                qmp("cont")
            else:
                ser = wd / "serial.log"
                while not (ser.exists() and "READY" in ser.read_text(errors="replace")):
                    time.sleep(0.01)
            qmp("system_powerdown")
            p.wait(timeout=120)
            return time.monotonic() - t
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
