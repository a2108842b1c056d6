"""The grace: how long after servicing ends an undelivered message waits before it
counts as lost. Set in the playbook, calibrated by baselines.yaml (3 x the slowest
delivery it saw plus the guest's shutdown allowance), or a default that a run
calibrates itself once it has seen a few deliveries."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from testbed.core.config import VmConfig
from testbed.core.paths import cache_dir
from testbed.engine.playbook import Playbook

DEFAULT_GRACE_MS = 1500.0


def calibration_path(accel: str) -> Path:
    return cache_dir() / f"grace-calibration-{accel}.json"


def grace_for(pb: Playbook, cfg: VmConfig, accel: str) -> tuple[float, str]:
    """The grace after servicing ends before an undelivered message counts as lost.

    Calibrated by the baselines playbook (3x the slowest delivery it saw,
    plus the guest's shutdown time); a default otherwise.
    """
    if pb.grace_ms != "auto":
        return float(pb.grace_ms), "set in the playbook"
    p = calibration_path(accel)
    if p.exists():
        cal = json.loads(p.read_text())
        return max(300.0, 3 * cal["max_delivery_ms"] + cfg.shutdown_allowance_ms), f"calibrated {p}"
    return (
        DEFAULT_GRACE_MS + cfg.shutdown_allowance_ms,
        "default (run playbooks/baselines.yaml to calibrate)",
    )


def one_guest_reference(accel: str) -> dict[str, Any] | None:
    """The one-guest spread baselines.yaml recorded on this machine, if it did."""
    p = calibration_path(accel)
    try:
        ref = json.loads(p.read_text()).get("one_guest")
    except (OSError, ValueError):
        return None
    return {**ref, "source": str(p)} if ref else None


IN_RUN_DELIVERIES = 5  # deliveries seen before the default grace is replaced
IN_RUN_FLOOR_MS = 500.0


class Deliveries:
    """The deliveries a run has seen (how many, the slowest), kept as records come in, so
    the in-run grace costs the same on the thousandth try as on the first."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.n, self.slowest = 0, 0.0
        for r in records:
            self.add(r)

    def add(self, rec: dict[str, Any]) -> None:
        if rec["verdict"] in ("preserved", "delivered-before") and rec.get("delivery_ms") is not None:
            self.n, self.slowest = self.n + 1, max(self.slowest, float(rec["delivery_ms"]))

    def grace(self, default: tuple[float, str], allowance_ms: float) -> tuple[float, str]:
        """A default grace, calibrated from what this run has seen: once it has watched
        IN_RUN_DELIVERIES messages delivered, 3 x the slowest delivery plus the guest's
        shutdown allowance (the baselines playbook's rule), never above the default and
        never below IN_RUN_FLOOR_MS. A grace set in the playbook or calibrated by
        baselines.yaml is kept as it is."""
        if not default[1].startswith("default") or self.n < IN_RUN_DELIVERIES:
            return default
        grace = min(default[0], max(IN_RUN_FLOOR_MS, 3 * self.slowest + allowance_ms))
        return grace, (f"in-run: 3 x the slowest of {self.n} deliveries ({self.slowest:.0f} ms) + "
                       f"{allowance_ms:.0f} ms")  # fmt: skip


def in_run_grace(
    records: list[dict[str, Any]], default: tuple[float, str], allowance_ms: float
) -> tuple[float, str]:
    """``Deliveries.grace`` over a list of records."""
    return Deliveries(records).grace(default, allowance_ms)
