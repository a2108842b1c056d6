"""The OpenVMM backend: OpenHCL in VTL2 under openvmm, driven through its console.

openvmm's RPC API has no servicing or shutdown call, so the host driver
(``hostside.py``, a Python program next to openvmm, started over the same
transports as the QEMU agent: a subprocess here, a zipapp over SSH) runs
openvmm in a terminal and types ``service-vtl2`` and ``shutdown`` at the
planned offset on the host's own clock.  This class builds the command line
from the vm_config, checks the binary's flags first (they change between
builds), and turns the driver's answers into evidence.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.base import host_program_errors
from testbed.backends.memory import MemoryHold
from testbed.backends.openvmm import evidence
from testbed.backends.openvmm.capabilities import CAPABILITIES
from testbed.backends.openvmm.config import OpenVmmSpec, OpenVmmVmConfig
from testbed.backends.openvmm.hostside import VM_OVERHEAD_MB
from testbed.core.errors import InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan
from testbed.core.verdicts import Verdict
from testbed.hostprog.client import HostProgram
from testbed.transport import LocalTransport, Transport

log = logging.getLogger(__name__)

DRIVER = "testbed.backends.openvmm.hostside"
# Flags every launch uses; a build without one of them is refused before anything starts.
REQUIRED_FLAGS = ("--hv", "--vtl2", "--igvm", "--vmbus-redirect", "--vmbus-com1-serial")
_vm_numbers = itertools.count(1)


@dataclass
class OpenVmmVm:
    name: str
    cfg: OpenVmmVmConfig
    strategy: str
    host: str
    version: str
    flags: list[str]
    workdir: str
    accel: str = "whp"
    running: bool = False
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> OpenVmmSpec:
        return self.cfg.openvmm

    def record(self) -> dict[str, Any]:
        return {"vm": self.name, "host": self.host, "vm_config": self.cfg.name, "accel": self.accel,
                "openvmm_version": self.version, "paravisor": os.path.basename(self.spec.igvm.replace("\\", "/")),
                "igvm": self.spec.igvm, "strategy": self.strategy, "accel_reason": "OpenVMM host"}  # fmt: skip


def launch_argv(vm: OpenVmmVm) -> list[str]:
    """openvmm's command line for OpenHCL with VTL0 relayed through it. ``{com1}`` and
    ``{com3}`` are files in the VM's work dir, filled in on the host."""
    s = vm.spec
    argv = [s.binary, "--hv", "--vtl2", "--igvm", s.igvm, "--vmbus-redirect", "-m", s.memory, "-p", str(s.processors),
            # COM1 defaults to the console, which then starts in serial input mode until
            # Ctrl-Q: bind it away so the prompt comes at once.
            "--com1", "none", "--vmbus-com1-serial", "file={com1}"]  # fmt: skip
    if s.com3 and "--com3" in vm.flags:
        argv += ["--com3", "file={com3}"]
    if "--guest-shutdown-action" in vm.flags:  # from 2026-06 (#3642); older builds exit on poweroff anyway
        argv += ["--guest-shutdown-action", "halt"]
    for c in s.openhcl_cmdline:
        argv += ["-c", c]
    if s.vtl0_disk:
        argv += ["--vmbus-scsi", "id=scsi0,vtl2", "--openhcl-controller", "id=relay0,type=scsi",
                 "--disk", f"file:{s.vtl0_disk},on=scsi0,relay=relay0"]  # fmt: skip
    return argv + list(s.extra_args)


def service_command(vm: OpenVmmVm, image: str | None) -> str:
    """``service-vtl2`` with the vm_config's flags; ``image`` a name from ``openvmm.images``
    (or an IGVM path on the host) for cross-version servicing."""
    f = vm.spec.service
    cmd = ["service-vtl2"]
    if f.user_mode_only:
        cmd.append("-u")
    if f.nvme_keepalive:
        cmd.append("-n")
    if f.mana_keepalive:
        cmd.append("--mana-keepalive")
    if image is not None:
        path = vm.spec.images.get(image, image)
        if any(ch.isspace() for ch in path):
            raise InfraError(
                f"IGVM path {path!r} has white space: the console cannot take it as one argument"
            )
        cmd += ["--igvm", path]
    return " ".join(cmd)


class OpenVmmBackend:
    kind = "openvmm"
    capabilities = CAPABILITIES

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport: Transport = transport or LocalTransport()
        self.host = self.transport.name
        self.driver = HostProgram(self.transport, DRIVER)
        self.free_memory_mb: int | None = None  # as the last preflight read it
        self.memory = MemoryHold(self.host)  # its VM's share of the host's free memory, against other lanes

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        with host_program_errors():
            return self.driver.call(op, timeout=timeout, **args)

    def close(self) -> None:
        self.memory.release()
        self.driver.close()

    def __enter__(self) -> OpenVmmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_path(self, *parts: str) -> str:
        with host_program_errors():
            self.driver.client  # noqa: B018 (starts the driver; its hello says where things go)
        return "/".join([str(self.driver.hello["runtime_dir"]), *parts])

    # ---- preflight ---------------------------------------------------------------
    def preflight(self, cfg: Any = None, *, deep: bool = False) -> HostReport:
        rep = HostReport(self.host)
        spec = cfg.openvmm if isinstance(cfg, OpenVmmVmConfig) else None
        try:
            host = self.call("preflight", timeout=90, binary=spec.binary if spec else "openvmm",
                             igvm=spec.igvm if spec else "", memory_mb=spec.memory_mb if spec else 1024)  # fmt: skip
        except InfraError as e:
            rep.checks.append(
                Check("host driver", False, str(e), "check the host URI, SSH access and python3")
            )
            return rep
        self.free_memory_mb = host.get("free_memory_mb")
        rep.checks += [Check(c["name"], c["ok"], c["detail"], c["fix"]) for c in host["checks"]
                       if spec is not None or c["name"] != "IGVM"]  # fmt: skip
        if spec is not None:
            try:
                p = self.call("probe", timeout=90, binary=spec.binary)
                missing = [f for f in REQUIRED_FLAGS if f not in p["flags"]]
                rep.checks.append(Check("openvmm flags", not missing,
                                        "all present" if not missing else f"missing {', '.join(missing)}",
                                        "use an openvmm build with OpenHCL support (flags change between builds)"))  # fmt: skip
            except InfraError as e:
                rep.checks.append(Check("openvmm flags", False, str(e), "see the message"))
        return rep

    # ---- lifecycle ---------------------------------------------------------------
    def provision(self, cfg: OpenVmmVmConfig, strategy: str = "none") -> OpenVmmVm:
        if not isinstance(cfg, OpenVmmVmConfig):
            raise InfraError(f"vm_config {cfg.name} is for backend {cfg.backend}, not openvmm")
        rep = self.preflight(cfg)
        bad = [c for c in rep.checks if not c.ok]
        if bad:
            raise InfraError(
                "host not ready: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad)
            )
        self.memory.take(self.free_memory_mb, cfg.openvmm.memory_mb + VM_OVERHEAD_MB)
        p = self.call("probe", timeout=90, binary=cfg.openvmm.binary)
        # Unique per VM of this process (lanes provision at the same millisecond).
        name = f"{cfg.name}-{socket.gethostname()}-{os.getpid()}-{next(_vm_numbers)}"
        if strategy != "none":
            log.info(
                "strategy %r: openvmm's own preservation is what is tested (a stand-in reads it)", strategy
            )
        return OpenVmmVm(
            name, cfg, strategy, self.host, p["version"], p["flags"], self.host_path("vms", name)
        )

    def start(self, vm: OpenVmmVm, reset: str = "cold") -> dict[str, Any]:
        """A fresh openvmm per iteration (there is no snapshot reset), booted until VTL0
        shows it is up on COM1."""
        s = vm.spec
        env = {"OPENVMM_LOG": s.log, "TESTBED_STRATEGY": vm.strategy, **s.env}
        t = time.monotonic()
        try:
            self.call("launch", timeout=120, name=vm.name, argv=launch_argv(vm), env=env, workdir=vm.workdir,
                      owner_pid=os.getpid() if self.transport.is_local else 0)  # fmt: skip
            vm.running = True
            ready = self.call("wait_ready", timeout=s.boot_timeout_s + 30, name=vm.name,
                              pattern=s.vtl0_ready_pattern, timeout_s=s.boot_timeout_s)  # fmt: skip
        except InfraError as e:
            self.destroy(vm)
            raise InfraError(f"start of {vm.name} failed: {e}") from None
        return {
            "wall_s": time.monotonic() - t,
            "reset": "cold",
            "requested_reset": reset,
            "ready_line": ready["line"],
        }

    def race(self, vm: OpenVmmVm, plan: RacePlan, grace_ms: float) -> RaceEvidence:
        s = vm.spec
        service = service_command(vm, plan.image) if plan.service else None
        shutdown = "shutdown" if plan.shutdown else None
        grace = max(grace_ms, s.shutdown_grace_ms)
        offset = None if plan.shutdown_mode == "after-ready" else float(plan.offset_ms or 0.0)
        raw = self.call("race", timeout=s.servicing_timeout_s + 2 * grace / 1000 + 60, name=vm.name,
                        service_cmd=service, shutdown_cmd=shutdown, offset_ms=offset,
                        servicing_timeout_s=s.servicing_timeout_s, grace_ms=grace,
                        mode=plan.shutdown_mode, phase=plan.phase)  # fmt: skip
        raw.update(service_cmd=service, shutdown_cmd=shutdown, grace_ms=grace, openvmm_version=vm.version,
                   servicing_timeout_s=s.servicing_timeout_s, vtl0_shutdown_pattern=s.vtl0_shutdown_pattern,
                   com3_servicing_start_pattern=s.com3_servicing_start_pattern)  # fmt: skip
        vm.last = raw
        return evidence.evidence(raw)

    def classify(self, ev: RaceEvidence) -> Verdict:
        return evidence.classify(ev)

    def collect(self, vm: OpenVmmVm, dest: Path, *, everything: bool = False) -> list[Path]:
        """The race's own evidence: console, log, COM1 and COM3 with host times, and argv."""
        if not vm.last:
            return []
        zero = vm.last.get("t0_ns", vm.last.get("begin_ns", 0))
        out = []
        for stream in ("console", "log", "COM1", "COM3"):
            p = dest / f"{stream.lower()}.log"
            p.write_text("".join(f"{(t - zero) / 1e6:10.1f} {ln}\n" for t, ln in vm.last.get(stream, [])))
            out.append(p)
        (dest / "openvmm.json").write_text(
            json.dumps({"argv": launch_argv(vm), "version": vm.version}, indent=2)
        )
        out.append(dest / "openvmm.json")
        vm.last = {}
        return out

    def destroy(self, vm: OpenVmmVm) -> None:
        try:
            if vm.running and self.driver.running:
                self.call("destroy", timeout=60, name=vm.name)
        except InfraError as e:
            log.warning("destroy of %s through the driver failed (%s); the driver's exit ends it", vm.name, e)
        finally:
            vm.running = False

    def gc_host(self) -> list[str]:
        res: list[str] = self.call("gc", timeout=120)["actions"]
        return res
