"""One record per finished iteration: what results.jsonl keeps of it, the slim copy a run
keeps in memory for its searches and statistics, and the file put back in iteration
order once the lanes are done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from testbed.core.runfolder import read_results
from testbed.engine.iterate import IterationResult

SLIM = ("iteration", "case", "host", "host_gone", "planned_offset_ms", "verdict", "delivery_ms", "phase_times_ms", "arm",
        "servicing_lag_ms", "skew_ms")  # fmt: skip


def slim(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in SLIM}


def record(r: IterationResult, case: str, strategy: str, vm: Any, reset: str, it_dir: Path) -> dict[str, Any]:
    """One line of results.jsonl: the plan, the numbers the evidence gives, the verdict."""
    ev, plan = r.evidence, r.plan
    return {
        "iteration": plan.iteration,
        "case": case,
        "planned_offset_ms": plan.offset_ms,  # with shutdown_mode ic-ready: the delay after the re-offer
        "shutdown_mode": plan.shutdown_mode,
        "offset_ms": ev.offset_ms if plan.service else None,
        "guest_offset_ms": ev.guest_offset_ms,
        "ic_ready_offset_ms": ev.ic_ready_offset_ms,
        "phase": plan.phase,
        "arm": plan.arm,
        "phase_to_fire_ms": ev.phase_to_fire_ms,
        "phase_times_ms": ev.phase_times_ms() or None,
        "skew_ms": ev.skew_ms(plan.offset_ms) if plan.service and plan.shutdown else None,
        "servicing_lag_ms": ev.servicing_lag_ms,
        "servicing_ms": ev.servicing_ms,
        "delivery_ms": ev.delivery_ms,
        "servicing_proof": ev.servicing_proof,
        "stream": ev.stream,
        **r.verdict.as_dict(),
        "decision": ev.decision,
        "ic_at_fire": ev.ic_at_fire,
        "strategy": strategy,
        "features": ev.features,
        "image": plan.image or vm.record()["paravisor"],
        "accel": vm.accel,
        "reset": r.boot.get("reset", reset),  # what the backend used, which may differ from the ask
        "reset_fallback": r.boot.get("reset_fallback"),  # why, when it differs
        "boot_s": r.boot.get("wall_s"),
        "slot_wait_s": r.boot.get("slot_wait_s"),  # waiting for another run's guest to end
        "started": r.started,
        "duration_s": r.duration_s,
        "phases_s": {k.removesuffix("_s"): round(v, 4) for k, v in r.phases.items()},
        "dir": str(it_dir),
        **({"host_gone": True} if r.host_gone else {}),
    }


def sort_results(path: Path) -> None:
    """results.jsonl in iteration order (lanes finish out of order; a resume appends):
    rewritten through a fsynced temporary file and an atomic rename, so a crash here
    leaves the old file whole. Nothing is done when the order is already right."""
    recs = read_results(path)
    order = [r.get("iteration", 0) for r in recs]
    if order == sorted(order):
        return
    tmp = path.with_suffix(".jsonl.sorting")
    with tmp.open("w", encoding="utf-8") as f:
        for r in sorted(recs, key=lambda r: r.get("iteration", 0)):
            f.write(json.dumps(r, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
