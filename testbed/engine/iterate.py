"""One iteration, the same everywhere: start -> race -> classify -> collect -> destroy.

The runner, ``testbed.api`` and ``testbed repro`` all call :func:`iterate`, so
a verdict means the same thing whichever way it was asked for.  The engine
handles only what every backend shares (an InfraError is ``infra-error``);
everything else is the backend's own ``classify``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.backends.base import Backend
from testbed.core.errors import HostGone, InfraError
from testbed.core.evidence import RaceEvidence, RacePlan
from testbed.core.verdicts import Verdict

# Verdicts after which --keep-failed keeps nothing extra: the iteration did what it should.
GOOD = ("preserved", "delivered-before")


@dataclass
class IterationResult:
    plan: RacePlan
    verdict: Verdict
    evidence: RaceEvidence
    boot: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # wall clock
    duration_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    # Where the seconds went (host clock): start (boot or restore to ready), race (with
    # servicing and the wait after it split out when known), collect, teardown.
    phases: dict[str, float] = field(default_factory=dict)
    host_gone: bool = False  # the host stopped answering (HostGone): a fleet drains it at once

    @property
    def failed(self) -> bool:
        return self.verdict.kind not in GOOD


def iterate(
    backend: Backend,
    vm: Any,
    plan: RacePlan,
    grace_ms: float,
    *,
    reset: str = "snapshot",
    dest: Path | None = None,
    keep_failed: bool = False,
    keep_vm: bool = False,
) -> IterationResult:
    """Run one iteration on a fresh start of ``vm``.

    ``dest`` receives the backend's evidence files (always, also after a
    failure); with ``keep_failed`` a failed iteration keeps everything the
    backend can give (for QEMU the snapshot it was restored from).
    ``keep_vm`` leaves the VM running for inspection (``repro --keep``): the
    caller destroys it."""
    t_wall, t = time.time(), time.monotonic()
    boot: dict[str, Any] = {}
    files: list[Path] = []
    phases: dict[str, float] = {}
    mark = t
    host_gone = False

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = now - mark
        mark = now

    try:
        try:
            boot = backend.start(vm, reset=reset)
            lap("start_s")
            ev = backend.race(vm, plan, grace_ms)
            lap("race_s")
        except InfraError as e:
            lap("start_s" if "start_s" not in phases else "race_s")
            ev = RaceEvidence.failed(backend.kind, str(e))
            host_gone = isinstance(e, HostGone)
        verdict = Verdict.infra(ev.infra_error) if ev.infra_error else backend.classify(ev)
        if dest is not None:
            dest.mkdir(parents=True, exist_ok=True)
            files = backend.collect(vm, dest, everything=keep_failed and verdict.kind not in GOOD)
        lap("collect_s")
    finally:
        if not keep_vm:
            backend.destroy(vm)
        lap("teardown_s")
    if ev.servicing_ms is not None and "race_s" in phases:
        # Inside the race: servicing (request to done), then the wait for the VM's fate
        # (a delivery, or the grace running out), on the host's clock.
        phases["servicing_s"] = ev.servicing_ms / 1000
        phases["after_servicing_s"] = max(0.0, phases["race_s"] - phases["servicing_s"])
    return IterationResult(plan, verdict, ev, boot, t_wall, time.monotonic() - t, files, phases, host_gone)
