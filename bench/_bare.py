"""Bare QEMU, no testbed in the path: the floor the benchmarks compare against."""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.agent.agent import qemu_argv


def _qmp(path: Path, *commands: dict[str, Any]) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    f = s.makefile("rw")
    f.readline()  # greeting
    for cmd in ({"execute": "qmp_capabilities"}, *commands):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:  # skip events until the reply
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
    s.close()


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
            if incoming:
                while True:
                    time.sleep(0.005)
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(wd / "qmp.sock"))
                    f = s.makefile("rw")
                    f.readline()
                    f.write('{"execute":"qmp_capabilities"}\n{"execute":"query-migrate"}\n')
                    f.flush()
                    f.readline()
                    st = json.loads(f.readline())
                    s.close()
                    if st.get("return", {}).get("status") == "completed":
                        break
                _qmp(wd / "qmp.sock", {"execute": "cont"})
            else:
                ser = wd / "serial.log"
                while not (ser.exists() and "READY" in ser.read_text(errors="replace")):
                    time.sleep(0.01)
            _qmp(wd / "qmp.sock", {"execute": "system_powerdown"})
            p.wait(timeout=120)
            return time.monotonic() - t
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
