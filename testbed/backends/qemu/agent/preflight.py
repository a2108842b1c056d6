"""What a QEMU host has: the agent's hello, QEMU's version and capabilities, and the
preflight checks of ``testbed host check``, each missing thing with its fix.

Stdlib only, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.core.paths import cache_dir, runtime_dir
from testbed.hostprog import leases
from testbed.hostprog.rpc import AgentError


class HostInfo:
    async def op_hello(self) -> dict[str, Any]:
        """Who and where: the host's own cache and runtime dirs (paths on the host)."""
        return {
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "clock_ns": time.monotonic_ns(),
            "cache_dir": str(cache_dir()),
            "runtime_dir": str(runtime_dir()),
            "hostname": os.uname().nodename,
        }

    async def op_exists(self, path: str) -> dict[str, Any]:
        p = Path(path)
        return {"exists": p.exists(), "size": p.stat().st_size if p.exists() else None}

    async def op_gc(self) -> dict[str, Any]:
        """Reap leases on this host whose owner is gone (``testbed gc --host``)."""
        return {"actions": leases.gc(runtime_dir() / "leases")}

    async def op_preflight(self, qemu: str | None = None) -> dict[str, Any]:
        """Host-side facts for ``testbed host check``: each missing thing is named."""
        checks = []
        try:
            qv = await self.op_qemu_version(qemu)
            detail = f"{qv['binary']}: {qv['version']}" + (
                "" if qv["action"] else " (no -action: panics are caught from GUEST_PANICKED)"
            )
            m = re.search(r"version (\d+)\.(\d+)", qv["version"])
            old_qemu = m is not None and (int(m.group(1)), int(m.group(2))) < MIN_QEMU
            if old_qemu:
                detail += f" (testbed needs QEMU {MIN_QEMU[0]}.{MIN_QEMU[1]} or newer: Debian 11's is the oldest tested)"
            checks.append(_check("qemu", bool(qv["version"]) and not old_qemu, detail,
                                 "install a newer qemu-system-x86 (or name one as qemu_binary in the inventory)"))  # fmt: skip
        except AgentError as e:
            checks.append(_check("qemu", False, str(e), "apt-get install qemu-system-x86 (RHEL: dnf install qemu-kvm), "
                                 "or name the binary as qemu_binary in the inventory"))  # fmt: skip
        kvm = Path("/dev/kvm")
        usable = kvm.exists() and os.access(kvm, os.R_OK | os.W_OK)
        state = "read/write" if usable else ("no access" if kvm.exists() else "absent")
        checks.append(
            _check(
                "/dev/kvm",
                True,
                f"{state} (TCG works regardless; the KVM probe decides)",
                "add the user to group kvm" if kvm.exists() and not usable else "",
            )
        )
        free = shutil.disk_usage(cache_dir()).free
        checks.append(
            _check(
                "disk",
                free > 2 << 30,
                f"{free / 2**30:.1f} GiB free in {cache_dir()}",
                "free at least 2 GiB in the testbed cache dir",
            )
        )
        rt = runtime_dir()
        checks.append(_check("runtime dir", os.access(rt, os.W_OK), str(rt), f"make {rt} writable"))
        checks.append(
            _check("python", sys.version_info >= (3, 9), sys.version.split()[0], "install python3 >= 3.9")
        )
        return {"checks": checks}

    async def op_clock(self) -> dict[str, Any]:
        return {"clock_ns": time.monotonic_ns()}

    async def op_qemu_version(self, qemu: str | None = None) -> dict[str, Any]:
        """The QEMU binary, its version and what its command line offers (probed, never
        assumed: ``-action`` arrived in QEMU 6.0, and Debian 11 has 5.2)."""
        binary = find_qemu(qemu)
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
            helptext = subprocess.run([binary, "-help"], capture_output=True, text=True, timeout=20).stdout
        except (FileNotFoundError, PermissionError):
            raise AgentError("qemu-missing", f"{binary} not found") from None
        return {"version": out.stdout.splitlines()[0] if out.stdout else "", "binary": binary,
                "action": "\n-action " in helptext}  # fmt: skip


MIN_QEMU = (5, 2)  # the oldest tested: Debian 11
QEMU_CANDIDATES = ("qemu-system-x86_64", "/usr/libexec/qemu-kvm")  # Debian/Ubuntu, RHEL family


def find_qemu(given: str | None) -> str:
    """The QEMU to run: the one named (inventory ``qemu_binary``, $TESTBED_QEMU_BINARY),
    else the first of the distributions' usual places that exists."""
    name = given or os.environ.get("TESTBED_QEMU_BINARY")
    if name:
        return name
    for c in QEMU_CANDIDATES:
        found = shutil.which(c) or (c if os.access(c, os.X_OK) else None)
        if found:
            return found
    raise AgentError("qemu-missing", f"no QEMU found (tried {', '.join(QEMU_CANDIDATES)})")


def _check(name: str, ok: bool, detail: str, fix: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, "fix": fix}
