"""The OpenVMM host driver: runs next to openvmm, drives its interactive console
in a terminal, fires the race on the host's monotonic clock, and stamps every
console, log and serial line with that clock.

openvmm's console needs a terminal: without one its console thread panics
("failed to enable raw console mode") and openvmm aborts.  On Linux (the
stand-in in tests) the driver gives it a pty as its controlling terminal; on
Windows a pseudo console through pywinpty (``pip install pywinpty`` on the host,
which ``playbooks/hosts/openvmm-host.yml`` does): a maintained library that
wraps ConPTY, instead of a hundred lines of untested ctypes here.  Log lines go
to a pipe (stderr), so they arrive clean; COM1 (VTL0, relayed through OpenHCL)
and COM3 (OpenHCL's console) go to files that are tailed.

Protocol and lifetime: ``testbed.hostprog.rpc`` (JSON lines; stdin closing ends
every openvmm this driver started).  Stdlib only, valid on Python 3.9: it ships
as a zipapp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from testbed.backends.openvmm.console import PROMPT, event, parse
from testbed.backends.openvmm.trigger import Race
from testbed.core.paths import cache_dir, runtime_dir, shared_dir
from testbed.hostprog import leases, rpc
from testbed.hostprog.rpc import AgentError
from testbed.hostprog.timing import sleep_until_ns

QUIT_WAIT_S = 5.0  # `quit` waits behind a stuck servicing: kill after this
VM_OVERHEAD_MB = 512  # openvmm and VTL2 beside memory_mb: what preflight and a lane's memory hold add


class Stamped:
    """Lines of one stream, each stamped with the host's monotonic clock on arrival."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[tuple[int, str]] = []
        self.raw = bytearray()  # everything, for the run folder
        self._partial = ""
        self._lock = threading.Lock()

    def feed(self, text: str, t_ns: int | None = None) -> None:
        t = t_ns if t_ns is not None else time.monotonic_ns()
        with self._lock:
            self.raw += text.encode(errors="replace")
            self._partial += text
            parts = re.split(r"\r\n|\n|\r(?!\n)", self._partial)
            self._partial = parts.pop()
            self.lines += [(t, p) for p in parts if p.strip()]
            # A prompt is never followed by a newline; it counts as a line at once.
            if self._partial.endswith(PROMPT) or self._partial.strip() == PROMPT.strip():
                self.lines.append((t, self._partial))
                self._partial = ""

    def since(self, n: int) -> list[tuple[int, str]]:
        with self._lock:
            return list(self.lines[n:])

    def __len__(self) -> int:
        return len(self.lines)


def _tail(path: Path, out: Stamped, stop: threading.Event) -> None:
    """Follow a serial file (``file=`` binding) as it grows, every 2 ms."""
    pos = 0
    while not stop.is_set():
        try:
            with path.open("rb") as f:
                f.seek(pos)
                data = f.read()
        except OSError:
            data = b""
        if data:
            pos += len(data)
            out.feed(data.decode(errors="replace"))
        else:
            time.sleep(0.002)


def _pump(read: Any, out: Stamped, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data = read()
        except (OSError, EOFError):
            return
        if not data:
            return
        out.feed(data if isinstance(data, str) else data.decode(errors="replace"))


class Console:
    """openvmm in a terminal: write typed text, read what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self.screen = Stamped("console")
        self.log = Stamped("log")
        self.proc: Any = None  # a Popen on POSIX, a winpty.PtyProcess on Windows
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        if os.name == "nt":
            self._spawn_conpty(argv, env, cwd)
        else:
            self._spawn_pty(argv, env, cwd)

    def _spawn_pty(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        import fcntl
        import pty
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x00\x32\x00\xc8\x00\x00\x00\x00")  # 50 x 200

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=cwd,
                                     preexec_fn=controlling_tty, close_fds=True)  # fmt: skip
        os.close(slave)
        self.master = master
        self._write: Any = lambda b: os.write(master, b)
        self.pid = self.proc.pid
        self._start(lambda: os.read(master, 65536), self.screen)
        assert self.proc.stderr is not None
        self._start(self.proc.stderr.read1, self.log)  # type: ignore[attr-defined]

    def _spawn_conpty(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        try:
            from winpty import PtyProcess  # type: ignore[import-not-found]
        except ImportError:
            raise AgentError(
                "no-conpty", "pywinpty is missing on this Windows host: pip install pywinpty"
            ) from None
        # A pseudo console carries stdout and stderr together: log lines arrive on the screen.
        self.proc = PtyProcess.spawn(argv, cwd=cwd, env=env, dimensions=(50, 200))
        self._write = lambda b: self.proc.write(b.decode())
        self.pid = self.proc.pid
        self._start(lambda: self.proc.read(65536), self.screen)

    def _start(self, read: Any, out: Stamped) -> None:
        t = threading.Thread(target=_pump, args=(read, out, self.stop), daemon=True)
        t.start()
        self.threads.append(t)

    def type(self, text: str) -> int:
        """Type a command and Enter (a terminal in raw mode sends CR); the host time it left."""
        self._write((text + "\r").encode())
        return time.monotonic_ns()

    def exited(self) -> int | None:
        if os.name == "nt":
            return None if self.proc.isalive() else int(self.proc.exitstatus or 0)
        rc: int | None = self.proc.poll()
        return rc

    def kill(self) -> None:
        if os.name == "nt":
            with contextlib.suppress(Exception):
                self.proc.terminate(force=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(10)

    def close(self) -> None:
        self.stop.set()
        if os.name != "nt":
            with contextlib.suppress(OSError):
                os.close(self.master)


class Vm:
    def __init__(self, name: str, workdir: Path, console: Console) -> None:
        self.name = name
        self.workdir = workdir
        self.console = console
        self.com1 = Stamped("COM1")
        self.com3 = Stamped("COM3")
        self.lease: Path | None = None


class Driver(rpc.RpcServer):
    def __init__(self) -> None:
        super().__init__()
        self.vms: dict[str, Vm] = {}

    def vm(self, name: str) -> Vm:
        if name not in self.vms:
            raise AgentError("no-such-vm", f"no openvmm named {name!r} in this driver")
        return self.vms[name]

    # ---- host ----------------------------------------------------------------------
    async def op_hello(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "python": sys.version.split()[0], "os": platform.system(),
                "release": platform.release(), "clock_ns": time.monotonic_ns(), "cache_dir": str(cache_dir()),
                "runtime_dir": str(runtime_dir()), "hostname": socket.gethostname()}  # fmt: skip

    async def op_probe(self, binary: str) -> dict[str, Any]:
        """The binary's version and the flags its --help lists (flags change between builds)."""
        exe = shutil.which(binary) or (binary if os.path.isfile(binary) else None)
        if exe is None:
            raise AgentError("openvmm-missing", f"{binary} not found on the host")
        out = {}
        for arg in ("--version", "--help"):
            try:
                r = subprocess.run([exe, arg], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise AgentError("openvmm-broken", f"{exe} {arg}: {e}") from None
            out[arg] = r.stdout + r.stderr
        flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", out["--help"])))
        return {"path": exe, "version": _version(out["--version"]), "flags": flags}

    async def op_preflight(self, binary: str, igvm: str, memory_mb: int) -> dict[str, Any]:
        checks = []
        try:
            p = await self.op_probe(binary)
            checks.append(_check("openvmm", True, f"{p['path']}: {p['version']}", ""))
        except AgentError as e:
            checks.append(
                _check("openvmm", False, str(e), "install openvmm (playbooks/hosts/openvmm-host.yml)")
            )
        readable = os.access(igvm, os.R_OK) and os.path.isfile(igvm)
        checks.append(_check("IGVM", readable, igvm if readable else f"{igvm}: not a readable file",
                             "put the OpenHCL IGVM file there (the host playbook caches it)"))  # fmt: skip
        checks.append(_whp_check())
        free = _free_memory_mb()
        checks.append(_check("free memory", free is None or free >= memory_mb + VM_OVERHEAD_MB,
                             f"{free} MB free, need {memory_mb + VM_OVERHEAD_MB}" if free is not None else "unknown",
                             "stop other VMs or lower openvmm.memory_mb"))  # fmt: skip
        checks.append(_check("python", sys.version_info >= (3, 9), sys.version.split()[0], "python >= 3.9"))
        return {"checks": checks, "free_memory_mb": free}

    async def op_exists(self, path: str) -> dict[str, Any]:
        return {"exists": os.path.exists(path)}

    async def op_gc(self) -> dict[str, Any]:
        return {"actions": leases.gc(runtime_dir() / "leases")}

    # ---- lifecycle -------------------------------------------------------------------
    async def op_launch(self, name: str, argv: list[str], env: dict[str, str], workdir: str, owner_pid: int,
                        prompt_timeout_s: float = 60.0) -> dict[str, Any]:  # fmt: skip
        """Start openvmm in a terminal, its serial ports bound to files in ``workdir``
        (the caller's argv names them ``{com1}`` and ``{com3}``), and wait for the prompt."""
        if name in self.vms:
            raise AgentError("exists", f"{name} already runs in this driver")
        wd = Path(workdir)
        shared_dir(wd.parent)
        wd.mkdir(exist_ok=True)
        com1, com3 = wd / "com1.log", wd / "com3.log"
        argv = [a.replace("{com1}", str(com1)).replace("{com3}", str(com3)) for a in argv]
        (wd / "openvmm.argv").write_text("\n".join(argv) + "\n")
        full_env = {**os.environ, **env}
        try:
            console = Console(argv, full_env, str(wd))
        except FileNotFoundError:
            raise AgentError("openvmm-missing", f"{argv[0]} not found on the host") from None
        vm = Vm(name, wd, console)
        self.vms[name] = vm
        for path, out in ((com1, vm.com1), (com3, vm.com3)):
            t = threading.Thread(target=_tail, args=(path, out, console.stop), daemon=True)
            t.start()
        owner = owner_pid or os.getpid()
        vm.lease = leases.write(runtime_dir() / "leases", leases.Lease(
            name, console.pid, leases.start_time(console.pid), owner, leases.start_time(owner), str(wd), time.time()))  # fmt: skip
        end = time.monotonic() + prompt_timeout_s
        while not any(PROMPT.strip() in ln for _t, ln in console.screen.since(0)):
            rc = console.exited()
            if rc is not None:
                await asyncio.sleep(0.1)  # let the readers take the last words
                said = _tail_text(console)
                await self.destroy_vm(vm)
                raise AgentError("openvmm-failed", f"openvmm exited ({rc}) before its prompt: {said}")
            if time.monotonic() > end:
                said = _tail_text(console)
                await self.destroy_vm(vm)
                raise AgentError(
                    "openvmm-failed", f"no '{PROMPT.strip()}' prompt in {prompt_timeout_s:.0f} s: {said}"
                )
            await asyncio.sleep(0.005)
        return {"pid": console.pid, "argv": argv}

    async def op_wait_ready(self, name: str, pattern: str, timeout_s: float) -> dict[str, Any]:
        """Wait until VTL0 shows it is up on COM1 (its driver for the shutdown IC with it)."""
        vm = self.vm(name)
        rx = re.compile(pattern)
        t = time.monotonic()
        while True:
            hit = next(((ts, ln) for ts, ln in vm.com1.since(0) if rx.search(ln)), None)
            if hit is not None:
                return {"seconds": time.monotonic() - t, "line": hit[1]}
            if vm.console.exited() is not None:
                raise AgentError("openvmm-exited", f"openvmm exited while booting: {_tail_text(vm.console)}")
            halted = _first(vm, "guest-halted")
            if halted is not None:
                raise AgentError("guest-died", f"the guest halted while booting: {halted}")
            if time.monotonic() - t > timeout_s:
                raise AgentError("boot-timeout", f"no COM1 line matching {pattern!r} after {timeout_s:.0f} s")
            await asyncio.sleep(0.005)

    async def op_race(self, name: str, service_cmd: str | None, shutdown_cmd: str | None,
                      offset_ms: float | None, servicing_timeout_s: float, grace_ms: float,
                      mode: str = "offset", phase: str | None = None) -> dict[str, Any]:  # fmt: skip
        """service-vtl2 at t = 0 and the shutdown typed here: at the planned offset (mode
        offset), that long after a servicing phase's line arrives (phase), after the shutdown
        IC's re-negotiation on COM1 (ic-ready), or once servicing completed (after-ready,
        ``offset_ms`` None); then wait for the end of servicing (or the deadline: openvmm has
        none of its own) and for the shutdown's outcome (or the grace). Every phase is
        stamped on arrival; every stamped line is returned."""
        vm = self.vm(name)
        c = vm.console
        start = {s.name: len(s) for s in (c.screen, c.log, vm.com1, vm.com3)}
        race = Race(vm, start, shutdown_cmd, offset_ms, mode, phase)
        out = race.out
        if service_cmd is not None:
            if race.before_ns is not None:
                out["fire_ns"] = c.type(shutdown_cmd or "")
                await sleep_until_ns(out["fire_ns"] + race.before_ns)
            out["t0_ns"] = c.type(service_cmd)
            await race.fire_during(servicing_timeout_s, grace_ms)
        elif shutdown_cmd is not None:
            out["t0_ns"] = out["fire_ns"] = c.type(shutdown_cmd)
        # The shutdown's outcome: an answer, a halt, or the grace running out.
        grace_end = time.monotonic_ns() + int(grace_ms * 1e6)
        while time.monotonic_ns() < grace_end and c.exited() is None:
            race.stamp()
            if race.halted:
                await asyncio.sleep(0.05)  # the last serial lines
                break
            await asyncio.sleep(0.002)
        race.stamp()
        out["end_ns"] = time.monotonic_ns()
        out["exited"] = c.exited()
        for s in (c.screen, c.log, vm.com1, vm.com3):
            out[s.name] = s.since(start[s.name])
        return out

    async def op_destroy(self, name: str, remove_workdir: bool = True) -> dict[str, Any]:
        vm = self.vms.get(name)
        if vm is None:
            return {"destroyed": False}
        res = await self.destroy_vm(vm)
        if remove_workdir:
            shutil.rmtree(vm.workdir, ignore_errors=True)
        return res

    async def destroy_vm(self, vm: Vm) -> dict[str, Any]:
        """``quit``, then kill on a deadline (quit waits behind a stuck servicing, and a
        signal kills openvmm without restoring its terminal, which is ours anyway)."""
        self.vms.pop(vm.name, None)
        c = vm.console
        how = "already-exited"
        if c.exited() is None:
            how = "quit"
            with contextlib.suppress(OSError):
                c.type("quit")
            end = time.monotonic() + QUIT_WAIT_S
            while c.exited() is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if c.exited() is None:
                how = "killed"
                c.kill()
        c.close()
        if vm.lease is not None:
            vm.lease.unlink(missing_ok=True)
        return {"destroyed": True, "how": how, "pid": c.pid}

    async def close_all(self) -> None:
        for vm in list(self.vms.values()):
            await self.destroy_vm(vm)


def _first(vm: Vm, *names: str, since: dict[str, int] | None = None) -> str | None:
    """The first console or log line (since the given positions) that is one of ``names``."""
    for s in (vm.console.screen, vm.console.log):
        for _t, ln in s.since((since or {}).get(s.name, 0)):
            if event(parse(ln).message) in names:
                return ln
    return None


def _tail_text(c: Console) -> str:
    lines = [ln for _t, ln in c.log.since(0)[-5:] + c.screen.since(0)[-5:]]
    return " | ".join(parse(ln).text for ln in lines)[-800:]


def _version(said: str) -> str:
    """``openvmm --version``'s first line (``openvmm 0.1.0+g<sha>`` from openvmm #4162,
    2026-08). Builds before it have no --version: clap answers ``error: unexpected
    argument``, which is said as such, never recorded as the version."""
    first = said.strip().splitlines()[0] if said.strip() else ""
    if not first or first.startswith("error:"):
        return "unknown (this build has no --version: it predates openvmm 0.1.0, 2026-08)"
    return first


def _check(name: str, ok: bool, detail: str, fix: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, "fix": fix}


def _whp_check() -> dict[str, Any]:
    """OpenHCL on OpenVMM needs the Windows Hypervisor Platform (WHP): KVM and mshv have no VTL2."""
    if os.name != "nt":
        return _check("WHP", True, f"{platform.system()} host: no WHP; only an openvmm that brings its own VTL2 "
                      "(such as testbed's stand-in) can run OpenHCL here", "")  # fmt: skip
    import ctypes

    try:
        whp = ctypes.WinDLL("WinHvPlatform.dll")  # type: ignore[attr-defined]
    except OSError:
        return _check("WHP", False, "WinHvPlatform.dll is missing", "Enable-WindowsOptionalFeature -Online "
                      "-FeatureName HypervisorPlatform (or playbooks/hosts/openvmm-host.yml), then reboot")  # fmt: skip
    present = ctypes.c_uint32(0)
    written = ctypes.c_uint32(0)
    hr = whp.WHvGetCapability(
        0, ctypes.byref(present), 4, ctypes.byref(written)
    )  # WHvCapabilityCodeHypervisorPresent
    ok = hr == 0 and bool(present.value)
    return _check("WHP", ok, "hypervisor present" if ok else f"WHvGetCapability: hr={hr & 0xFFFFFFFF:#x}, present={present.value}",
                  "enable the Windows Hypervisor Platform feature and reboot")  # fmt: skip


def _free_memory_mb() -> int | None:
    if os.name == "nt":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]  # fmt: skip

        st = MemoryStatus()
        st.dwLength = ctypes.sizeof(st)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
            return int(st.ullAvailPhys // 2**20)
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def main() -> None:
    rpc.run(Driver)


if __name__ == "__main__":
    main()
