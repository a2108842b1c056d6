"""The mock backend: a race decided by the vm_config's window, timed on a fake host clock.

Every number it reports is consistent (fire time, phases, the IC's re-offer, the VM's
end), so the statistics, the searches and the reports see what a real backend would
give them; whether a shot is lost is drawn from a generator seeded by the iteration, so
a run is reproducible. Its evidence goes through the same ``decide`` as every backend's.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.mock.capabilities import CAPABILITIES, PHASES
from testbed.backends.mock.config import MockVmConfig
from testbed.core.errors import HostGone, InfraError
from testbed.core.evidence import Check, HostReport, RaceEvidence, RacePlan, TimelineEntry
from testbed.core.verdicts import Facts, Finding, Request, Verdict, decide

MS = 1_000_000  # ns


@dataclass
class MockVm:
    name: str
    cfg: MockVmConfig
    strategy: str
    accel: str = "mock"
    running: bool = False
    started: int = 0

    def record(self) -> dict[str, Any]:
        return {"vm": self.name, "host": "mock", "paravisor": self.cfg.paravisor, "accel": self.accel,
                "backend_version": "mock 1"}  # fmt: skip


@dataclass
class MockBackend:
    """One fake host; VMs are records in memory, so provisioning and teardown are free."""

    host: str = "mock"
    kind: str = "mock"
    capabilities = CAPABILITIES
    vms: list[MockVm] = field(default_factory=list)
    races: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def preflight(self, cfg: Any = None, *, deep: bool = False) -> HostReport:
        return HostReport(self.host, [Check("mock", True, "an in-process fake VM is always ready")])

    def provision(self, cfg: MockVmConfig, strategy: str = "none") -> MockVm:
        if self.host in cfg.unreachable:
            raise InfraError(f"{self.host}: connection refused (the mock's unreachable host)")
        with self._lock:
            vm = MockVm(f"{cfg.name}-mock{len(self.vms)}", cfg, strategy)
            self.vms.append(vm)
        return vm

    def start(self, vm: MockVm, reset: str = "cold") -> dict[str, Any]:
        vm.running, vm.started = True, vm.started + 1
        return {"wall_s": 0.0, "reset": reset}

    def race(self, vm: MockVm, plan: RacePlan, grace_ms: float) -> RaceEvidence:
        self.races += 1
        limit = vm.cfg.breaks_after.get(self.host)
        if limit is not None and self.races > limit:
            raise InfraError(f"{self.host}: the race failed (the mock's fault after {limit} races)")
        gone = vm.cfg.gone_after.get(self.host)
        if gone is not None and self.races > gone:
            raise HostGone(f"{self.host}: connection lost (the mock's fault after {gone} races)")
        if vm.cfg.race_ms:
            time.sleep(vm.cfg.race_ms / 1000)
        return simulate(vm.cfg, vm.strategy, plan, grace_ms, t0=time.monotonic_ns())

    def classify(self, ev: RaceEvidence) -> Verdict:
        return decide(facts(ev))

    def collect(self, vm: MockVm, dest: Path, *, everything: bool = False) -> list[Path]:
        out = dest / "mock.txt"
        out.write_text(f"{vm.name} start {vm.started} everything={everything}\n")
        return [out]

    def destroy(self, vm: MockVm) -> None:
        vm.running = False

    def gc_host(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def _fire_ms(cfg: MockVmConfig, plan: RacePlan) -> float | None:
    """When the shutdown is fired, in ms from the servicing request (None: not fired)."""
    if not plan.shutdown or plan.shutdown_mode == "none":
        return None
    x = plan.offset_ms or 0.0
    if plan.shutdown_mode == "after-ready":
        return cfg.servicing_ms + 1.0
    if plan.shutdown_mode == "ic-ready":
        return cfg.servicing_ms + x
    if plan.shutdown_mode == "phase":
        at = dict(PHASES)[plan.phase or "request-seen"] * cfg.servicing_ms
        return at + x
    return x


def _loses(cfg: MockVmConfig, strategy: str, plan: RacePlan, fire: float) -> bool:
    w = cfg.window
    if strategy not in cfg.lossy_strategies or not (w.lo_ms <= fire < w.hi_ms):
        return False
    rate = cfg.builds.get(plan.image or cfg.paravisor, w.rate) if cfg.builds else w.rate
    return random.Random(plan.iteration * 7919 + int(fire * 1000)).random() < rate


def simulate(cfg: MockVmConfig, strategy: str, plan: RacePlan, grace_ms: float, *, t0: int) -> RaceEvidence:
    """The race's evidence on a host clock whose servicing request is at ``t0``."""
    ev = RaceEvidence(backend="mock", zero_ns=t0, servicing_proof="restarted" if plan.service else None)
    done = cfg.servicing_ms if plan.service else 0.0
    if plan.service:
        ev.service_requested_ns, ev.service_started_ns = t0, t0 + int(0.02 * done * MS)
        ev.service_done_ns = ev.ic_reoffered_ns = t0 + int(done * MS)
        ev.phases = {name: t0 + int(frac * done * MS) for name, frac in PHASES}
        ev.timeline.append(TimelineEntry(t0, "host", "service"))
    fire = _fire_ms(cfg, plan)
    if fire is None:
        return ev
    ev.fire_planned_ns = t0 + int(fire * MS)
    ev.fire_ns = ev.fire_planned_ns + 20_000  # 20 us of trigger latency
    ev.message_id = f"m{plan.iteration}"
    if plan.shutdown_mode == "phase":
        ev.phase, ev.phase_ns = plan.phase, ev.phases.get(plan.phase or "")
    ev.timeline.append(TimelineEntry(ev.fire_ns, "host", f"shutdown at {fire:.3f} ms"))
    refused = cfg.refuse_until_reoffer and plan.service and cfg.window.hi_ms <= fire < done
    lost = not refused and _loses(cfg, strategy, plan, fire)
    ev.decision = "rejected" if refused else "posted"
    ev.ic_at_fire = "not-ready" if refused else "ready"
    if not refused and not lost:
        ev.ended, ev.end_reason = True, "guest-shutdown"
        ev.ended_ns = t0 + int((max(fire, done) + cfg.delivery_ms) * MS)
        ev.timeline.append(TimelineEntry(ev.ended_ns, "guest", "power off"))
    ev.raw = {"fire_ms": fire, "before": fire < 0 and plan.service, "refused": refused, "lost": lost}
    return ev


def facts(ev: RaceEvidence) -> Facts:
    """The mock's evidence in the shared terms (the same ``decide`` as every backend)."""
    raw = ev.raw
    if ev.message_id is None:
        return Facts(request="none", servicing="done" if ev.service_requested_ns else "none",
                     servicing_proof=ev.servicing_proof)  # fmt: skip
    line = f"mock: shutdown at {raw['fire_ms']:.3f} ms"
    request: Request = "refused" if raw["refused"] else "accepted"
    says = "the IC was not ready (refused)" if raw["refused"] else "the host posted the shutdown"
    return Facts(
        request=request,
        request_seen=Finding(says, (line,)),
        servicing="done" if ev.service_requested_ns is not None else "none",
        servicing_proof=ev.servicing_proof,
        servicing_seen=Finding("servicing done", ("mock: servicing done",)),
        acted=1 if ev.ended else 0,
        before_servicing=bool(raw["before"]),
        acted_seen=Finding("", ("mock: VTL0 shut down",)) if ev.ended else Finding(),
        ended=ev.ended,
        fate=Finding(
            "VM ended (guest-shutdown)" if ev.ended else "VM still running at the deadline", (line,)
        ),
    )
