"""QEMU processes on a lab host: started so that they die with the agent, and the KVM
probe's boots, CPU model by CPU model.

Stdlib only, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from testbed.backends.qemu.agent.argv import qemu_argv
from testbed.core.paths import shared_dir

PR_SET_PDEATHSIG = 1
# How QEMU says its command line is wrong (an option, a property, a device it lacks).
ARGUMENT_ERROR = re.compile(r"invalid option|unknown option|Parameter '.*' expects|property '.*' not found|"
                            r"'.*' is not a valid device model name|Invalid parameter|unsupported machine type", re.I)  # fmt: skip


def die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGKILL when the agent dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def boot_once(spec: dict[str, Any], wd: Path, timeout: float) -> dict[str, Any]:
    """One probe boot: ok when the guest's init line comes in time; else why not, with
    QEMU's own last words."""
    shared_dir(wd.parent)
    wd.mkdir(exist_ok=True)
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*qemu_argv(spec, wd), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
    try:
        while time.monotonic() - t < timeout:
            await asyncio.sleep(0)
            if proc.returncode is not None:
                err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                return {"ok": False, "exit": proc.returncode, "stderr": err.strip()[-300:]}
            ser = wd / "serial.log"
            if ser.exists() and "TB init" in ser.read_text(errors="replace"):
                return {"ok": True, "reason": f"guest reached init in {time.monotonic() - t:.1f} s"}
            await asyncio.sleep(0.05)
        return {"ok": False, "reason": f"guest did not reach init within {timeout:.0f} s (hung)"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(wd, ignore_errors=True)


# The CPU models the KVM probe tries, in order, and the abort that moves it to the next:
# QEMU cannot set IA32_ARCH_CAPABILITIES (MSR 0x10a) on some nested hosts.
CPU_MODELS = ("host", "host,-arch-capabilities")
MSR_ABORT = re.compile(r"failed to set MSR 0x10a\b")


async def probe_cpu_models(boot: Any) -> dict[str, Any]:
    """Try each CPU model with ``boot(model)`` (one probe boot's outcome) until one boots;
    only the MSR abort moves on to the next model, any other failure ends the probe. The
    answer names the model that won (``cpu``) or why KVM is unusable, with every
    attempt's reason (``attempts``)."""
    attempts: list[dict[str, Any]] = []
    for model in CPU_MODELS:
        res = await boot(model)
        err = res.get("stderr", "")
        if res.get("ok"):
            attempts.append({"cpu": model, "ok": True, "reason": res["reason"]})
            why = f"{res['reason']} with -cpu {model}"
            if len(attempts) > 1:
                why += f" (after -cpu {attempts[0]['cpu']}: {attempts[0]['reason']})"
            return {"ok": True, "cpu": model, "reason": why, "attempts": attempts}
        if err and ARGUMENT_ERROR.search(err):  # not KVM's fault: the same line fails under TCG
            return {"ok": False, "kind": "qemu-args", "attempts": attempts,
                    "reason": f"QEMU refused its arguments (not a KVM problem): {err}"}  # fmt: skip
        reason = res.get("reason") or f"QEMU exited ({res.get('exit')}): {err}"
        if MSR_ABORT.search(err):
            reason = f"QEMU aborted setting MSR 0x10a (IA32_ARCH_CAPABILITIES): {err}"
        attempts.append({"cpu": model, "ok": False, "reason": reason})
        if not MSR_ABORT.search(err):
            break
    said = "; ".join(f"-cpu {a['cpu']}: {a['reason']}" for a in attempts)
    return {"ok": False, "reason": said, "attempts": attempts}
