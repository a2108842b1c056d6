"""Lease files: who owns which QEMU, so a crashed run never leaves a guest behind.

Every QEMU the host agent starts gets a lease (its pid and start time, the
owner's pid and start time, its work dir).  Start times make pid reuse
harmless: a lease only matches a process whose ``/proc/PID/stat`` start time
is the one recorded.  ``gc`` kills the QEMU of every lease whose owner is gone.

Stdlib only: it runs inside the host agent too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.core.paths import shared_dir


def start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parens: fields start after the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[19])


def alive(pid: int, started: int | None) -> bool:
    """Is ``pid`` (started at ``started``, when known) still running? Without /proc (a
    Windows controller on the Hyper-V host) only existence can be checked: a reused pid
    then counts as alive, so gc errs on the side of keeping a VM."""
    if not Path("/proc/self/stat").exists():
        return _exists_without_proc(pid)
    st = start_time(pid)
    if st is None:
        return False
    if started is not None and st != started:
        return False  # the pid was reused by another process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _exists_without_proc(pid: int) -> bool:
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # POSIX without /proc: signal 0 only checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    name: str
    qemu_pid: int
    qemu_start: int | None
    owner_pid: int
    owner_start: int | None
    workdir: str
    created: float

    @property
    def path_name(self) -> str:
        return f"{self.name}-{self.qemu_pid}.json"


def write(lease_dir: Path, lease: Lease) -> Path:
    shared_dir(lease_dir)
    p = lease_dir / lease.path_name
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(lease)))
    os.replace(tmp, p)
    return p


def read_all(lease_dir: Path) -> list[tuple[Path, Lease | None]]:
    out: list[tuple[Path, Lease | None]] = []
    if not lease_dir.exists():
        return out
    for p in sorted(lease_dir.glob("*.json")):
        try:
            out.append((p, Lease(**json.loads(p.read_text()))))
        except (OSError, ValueError, TypeError):
            out.append((p, None))
    return out


def kill_group(pid: int, started: int | None, grace_s: float = 2.0) -> bool:
    """SIGTERM the process group of ``pid``, then SIGKILL. True if it was alive."""
    if not alive(pid, started):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            if not alive(pid, started):
                return True
            time.sleep(0.02)
    return True


def gc(lease_dir: Path, remove_workdirs: bool = True) -> list[str]:
    """Reap leases whose owner is dead. Returns one line per action taken."""
    actions: list[str] = []
    for path, lease in read_all(lease_dir):
        if lease is None:
            path.unlink(missing_ok=True)
            actions.append(f"removed unreadable lease {path.name}")
            continue
        if alive(lease.owner_pid, lease.owner_start):
            continue
        if kill_group(lease.qemu_pid, lease.qemu_start):
            actions.append(
                f"killed QEMU pid {lease.qemu_pid} of {lease.name} (owner {lease.owner_pid} is gone)"
            )
        if remove_workdirs and lease.workdir and Path(lease.workdir).is_dir():
            shutil.rmtree(lease.workdir, ignore_errors=True)
        path.unlink(missing_ok=True)
        actions.append(f"removed lease {path.name}")
    return actions
