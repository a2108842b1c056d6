"""Bare QEMU, no testbed in the path: the floors the benchmarks compare against.

``bare_cycle`` is launch -> ready -> poweroff. ``ideal_iteration`` does the guest work
of a real iteration (restore, servicing with the same save/restore times, a shutdown
after servicing, poweroff) through the raw sockets, with nothing of testbed between:
the honest floor for the race's rate."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.backends.qemu.agent.lifecycle import qemu_argv


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


class _Lines:
    """Line reader on one chardev socket (the lab's ports speak text lines)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def lines(self) -> list[str]:
        """What has arrived so far, without waiting."""
        out = []
        while select.select([self.sock], [], [], 0)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(line.decode(errors="replace").strip())
        return out


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    while True:
        try:
            s.connect(str(path))
            return s
        except OSError:
            time.sleep(0.002)


def ideal_iteration(spec: dict[str, Any], incoming: Path, knobs: dict[str, int], image: str = "v2") -> float:
    """Restore the READY snapshot -> SYNC/HELLO/WELCOME -> SERVICE (strategy none, the
    given knobs) -> the re-offer answered -> SVC_DONE -> the shutdown message -> the
    guest powers off and QEMU exits. Seconds, on the monotonic clock."""
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        argv = qemu_argv({**spec, "incoming": str(incoming)}, wd)
        t = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (wd / "qmp.sock").exists():
                time.sleep(0.002)
            vmbus, get = _Lines(_connect(wd / "vmbus.sock")), _Lines(_connect(wd / "get.sock"))
            qmp = _Qmp(wd / "qmp.sock")
            while (qmp("query-migrate") or {}).get("status") != "completed":
                time.sleep(0.005)
            qmp("cont")
            vmbus.send("SYNC")
            rx, state, deadline, acked = 0, "hello", time.monotonic() + 60, False
            while p.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ideal iteration stuck at {state}")
                for line in vmbus.lines():
                    acked = acked or (line.startswith("ACK") and "id=floor" in line)
                    if line.startswith("HELLO"):
                        rx = int(dict(f.split("=", 1) for f in line.split()[1:] if "=" in f).get("rx", rx))
                        vmbus.send("WELCOME features=-")
                        if state == "hello":
                            params = " ".join(f"{k}={v}" for k, v in knobs.items())
                            get.send(f"SERVICE id=1 image={image} strategy=none {params}")
                            state = "servicing"
                for line in get.lines():
                    if line.startswith("SVC_DONE") and state == "servicing":
                        if "ok=1" not in line:
                            raise RuntimeError(f"the floor's servicing failed: {line}")
                        vmbus.send(f"MSG seq={rx} t={time.monotonic_ns() // 1000} type=shutdown id=floor "
                                   "reason=floor")  # fmt: skip
                        state = "shutdown"
                time.sleep(0.001)
            took = time.monotonic() - t
            acked = acked or any(ln.startswith("ACK") and "id=floor" in ln for ln in vmbus.lines())
            if state != "shutdown" or not acked:
                raise RuntimeError(f"the floor's guest exited at {state} without acknowledging the shutdown")
            return took
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


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
