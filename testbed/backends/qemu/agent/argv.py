"""The QEMU command line for a lab VM: kept apart from the lifecycle that runs it, as
it is the one part that is plain data in, plain data out.

Stdlib only, valid on Python 3.9: this runs on lab hosts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def qemu_argv(spec: dict[str, Any], workdir: Path) -> list[str]:
    """The QEMU command line for a lab VM. Every guest runs with -no-reboot and, where
    QEMU has ``-action`` (6.0+; ``spec["action"]`` says), panic=shutdown, so a triple
    fault or panic ends the VM instead of rebooting; an older QEMU pauses a panicked
    guest, and its GUEST_PANICKED event ends the VM's wait instead (``lifecycle``'s
    ``_events``)."""
    accel = spec["accel"]
    argv = [
        spec.get("qemu") or os.environ.get("TESTBED_QEMU_BINARY", "qemu-system-x86_64"),
        "-machine",
        spec["machine"],
        "-accel",
        accel,
        "-m",
        str(spec["memory_mib"]),
        "-smp",
        str(spec["cpus"]),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *(["-action", "panic=shutdown"] if spec.get("action", True) else []),
        "-kernel",
        spec["kernel"],
        "-initrd",
        spec["initrd"],
        "-append",
        spec["cmdline"],
        "-chardev",
        f"file,id=ser0,path={workdir / 'serial.log'}",
        "-serial",
        "chardev:ser0",
        "-qmp",
        f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        "pvpanic",
    ]
    if accel == "kvm":
        argv += ["-cpu", spec.get("cpu_model") or "host"]
    for port in ("vmbus", "get"):
        argv += [
            "-chardev",
            f"socket,id={port},path={workdir / (port + '.sock')},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={port},name={port},id=port-{port}",
        ]
    if spec.get("incoming"):
        argv += ["-incoming", f"exec:cat {spec['incoming']}"]
    return argv
