"""The core loop: plan -> fresh VM -> race -> verdict -> record, many times.

Every iteration gets a VM in a known state (a cold boot or a snapshot
restore) and destroys it afterwards, so no iteration inherits another's
state.  Each finished iteration is appended to results.jsonl before the next
starts, so Ctrl-C or a crash loses nothing that finished.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed import __version__
from testbed.backends.base import Backend, InfraError, RacePlan
from testbed.backends.qemu.backend import QemuBackend
from testbed.backends.qemu.client import AgentFailure, AgentLost
from testbed.config import Case, Playbook, ScheduleSpec, VmConfig, apply_lab_overrides, stable_hash
from testbed.engine import schedule as sched
from testbed.engine.verdict import classify, fire_offsets, guest_time_us
from testbed.paths import cache_dir
from testbed.report import evaluate, exit_code, write_reports
from testbed.report.jsonl import ResultsWriter, read_results
from testbed.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_GRACE_MS = 1500.0


@dataclass
class RunOptions:
    strategy: str | None = None
    iterations: int | None = None
    offsets: dict[str, Any] | None = None
    seed: int | None = None
    out: Path | None = None
    stop_on_loss: bool | None = None
    keep_failed: bool = False
    max_duration_s: float | None = None
    resume: Path | None = None
    reset: str | None = None
    transport: Transport | None = None  # None: the local host
    backend: Backend | None = None  # given: used instead of a QEMU backend on ``transport``


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
    records: list[dict[str, Any]] = field(default_factory=list)


Progress = Callable[[dict[str, Any]], None]


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
        return max(300.0, 3 * cal["max_delivery_ms"] + cfg.lab.vtl0_shutdown_ms), f"calibrated {p}"
    return (
        DEFAULT_GRACE_MS + cfg.lab.vtl0_shutdown_ms,
        "default (run playbooks/baselines.yaml to calibrate)",
    )


def _timeline(res: dict[str, Any]) -> list[tuple[float, str]]:
    """Host log and guest serial on one axis: ms from the servicing request."""
    if "timeline" in res:  # backends that tell their own (Hyper-V)
        return [tuple(x) for x in res["timeline"]]
    t0 = res.get("t0_ns")
    if t0 is None:
        return []
    tl = [
        ((e["t_ns"] - t0) / 1e6, f"host {e['kind']} {e['port']}: {e['line']}")
        for e in res.get("host_log", [])
    ]
    svc = res.get("svc", {})
    if "guest_start_us" in svc and "start_ns" in svc:
        base = (svc["start_ns"] - t0) / 1e6
        for ln in res.get("serial", []):
            g = guest_time_us(ln)
            if g is not None and g >= svc["guest_start_us"] - 2_000_000:
                tl.append((base + (g - svc["guest_start_us"]) / 1000, "guest " + ln.split(" ", 2)[2]))
    for e in res.get("qmp_events", []):
        tl.append(((e["t_ns"] - t0) / 1e6, f"qmp {e['event']} {e.get('data')}"))
    return sorted(tl)


class Runner:
    def __init__(
        self,
        pb: Playbook,
        cfg: VmConfig,
        opts: RunOptions,
        progress: Progress | None = None,
        playbook_path: Path | None = None,
    ) -> None:
        self.pb = pb
        self.cfg = apply_lab_overrides(cfg, pb.lab)
        self.opts = opts
        self.progress = progress or (lambda _e: None)
        self.strategy = opts.strategy or pb.strategy
        self.seed = opts.seed if opts.seed is not None else pb.seed
        self.reset = opts.reset or pb.reset
        self.stop_on_loss = opts.stop_on_loss if opts.stop_on_loss is not None else pb.stop_on_loss
        self.playbook_path = playbook_path
        self.backend: Backend = opts.backend or QemuBackend(opts.transport)
        self.records: list[dict[str, Any]] = []
        self.interrupted = False

    # ---- planning --------------------------------------------------------------
    def cases(self) -> list[Case]:
        cases = self.pb.resolved_cases()
        if self.opts.iterations or self.opts.offsets:
            spec = ScheduleSpec(**self.opts.offsets) if self.opts.offsets else None
            cases = [
                c.model_copy(
                    update={k: v for k, v in (("iterations", self.opts.iterations), ("schedule", spec)) if v}
                )
                for c in cases
            ]
        return cases

    def plans(self, case: Case, start_index: int) -> Iterator[RacePlan]:
        n = case.iterations or self.pb.iterations
        image = case.image
        if case.shutdown != "offset":
            for i in range(n):
                yield RacePlan(
                    start_index + i,
                    None,
                    case.servicing,
                    case.shutdown != "none",
                    case.shutdown,
                    image,
                )
            return
        s = case.schedule or self.pb.schedule
        if s.kind == "adaptive":
            outcomes: dict[float, str] = {}

            def outcome(x: float) -> str | None:
                for r in reversed(self.records):
                    if r.get("case") == case.name and r.get("planned_offset_ms") == x:
                        return str(r["verdict"])
                return outcomes.get(x)

            assert s.lo_ms is not None and s.hi_ms is not None
            gen = sched.adaptive(
                s.lo_ms, s.hi_ms, n, outcome, coarse=s.coarse, resolution_ms=s.resolution_ms, seed=self.seed
            )
            for i, x in enumerate(gen):
                yield RacePlan(start_index + i, x, case.servicing, True, "offset", image)
            return
        if s.kind == "fixed":
            pts = list(s.offsets_ms or [])
        elif s.kind == "linear":
            assert s.start_ms is not None and s.stop_ms is not None
            pts = sched.linear(s.start_ms, s.stop_ms, s.count or n)
        else:
            assert s.lo_ms is not None and s.hi_ms is not None
            pts = sched.seeded_random(s.lo_ms, s.hi_ms, s.count or n, self.seed)
        for i, x in enumerate(sched.cycle_to(pts, n)):
            yield RacePlan(start_index + i, x, case.servicing, True, "offset", image)

    # ---- running ---------------------------------------------------------------
    def run_dir(self) -> Path:
        if self.opts.resume:
            return self.opts.resume
        if self.opts.out:
            return self.opts.out
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{stamp}-{self.pb.name}"

    def manifest(self, vm: Any, grace: tuple[float, str]) -> dict[str, Any]:
        return {
            "testbed_version": __version__,
            "playbook": self.pb.name,
            "playbook_path": str(self.playbook_path.resolve()) if self.playbook_path else None,
            "host": self.backend.host,
            "host_os": f"{platform.system()} {platform.release()} ({platform.version()})",
            **vm.record(),
            "seed": self.seed,
            "reset": self.reset,
            "config_hash": stable_hash(
                {"playbook": self.pb.model_dump(), "vm_config": self.cfg.model_dump()}
            ),
            "lab": self.cfg.lab.model_dump(),
            "grace_ms": grace[0],
            "grace_source": grace[1],
            "expect": self.pb.expect,
            "expect_by_case": {c.name: c.expect for c in self.cases()},
            "max_infra_errors": self.pb.max_infra_errors,
            "started": time.time(),
        }

    def run(self) -> RunResult:
        run_dir = self.run_dir()
        (run_dir / "iterations").mkdir(parents=True, exist_ok=True)
        done = read_results(run_dir / "results.jsonl") if self.opts.resume else []
        self.records = list(done)
        done_ids = {r["iteration"] for r in done}
        writer = ResultsWriter(run_dir / "results.jsonl")
        started = time.monotonic()
        vm: Any = None
        try:
            vm = self.backend.provision(self.cfg, self.strategy)
            grace = grace_for(self.pb, self.cfg, vm.accel)
            run_json = run_dir / "run.json"
            manifest = self.manifest(vm, grace)
            if self.opts.resume and run_json.exists():
                manifest = {**json.loads(run_json.read_text()), "resumed": time.time()}
            run_json.write_text(json.dumps(manifest, indent=2, default=str))
            total = sum((c.iterations or self.pb.iterations) for c in self.cases())
            self.progress(
                {
                    "event": "start",
                    "total": total,
                    "run_dir": str(run_dir),
                    "accel": vm.accel,
                    "grace_ms": grace[0],
                    "done": len(done),
                }
            )
            index = 0
            stop = False
            for case in self.cases():
                for plan in self.plans(case, index):
                    if plan.iteration in done_ids:
                        continue
                    if self.opts.max_duration_s and time.monotonic() - started > self.opts.max_duration_s:
                        log.warning("--max-duration reached; stopping before iteration %d", plan.iteration)
                        stop = True
                        break
                    rec = self.iteration(vm, case, plan, grace[0], run_dir)
                    writer.write(rec)
                    self.records.append(rec)
                    self.progress({"event": "iteration", "record": rec})
                    if rec["verdict"] == "lost" and self.stop_on_loss:
                        stop = True
                    if rec["verdict"] == "infra-error" and self.pb.on_infra_error == "stop":
                        stop = True
                    if stop:
                        break
                index += case.iterations or self.pb.iterations
                if stop:
                    break
            if self.pb.calibrate:
                self.write_calibration(vm.accel)
        except KeyboardInterrupt:
            self.interrupted = True
            log.warning("interrupted: cleaning up; finished iterations are kept")
        finally:
            writer.close()
            if vm is not None:
                self.backend.destroy(vm)
            self.backend.close()
            rj = run_dir / "run.json"
            if rj.exists():
                manifest = json.loads(rj.read_text())
                manifest.update(
                    {"interrupted": self.interrupted, "finished": time.time(), "run_dir": str(run_dir)}
                )
                rj.write_text(json.dumps(manifest, indent=2, default=str))
        summary = write_reports(run_dir)
        code = 130 if self.interrupted else exit_code(summary)
        return RunResult(run_dir, summary, code, self.records)

    def iteration(
        self, vm: Any, case: Case, plan: RacePlan, grace_ms: float, run_dir: Path
    ) -> dict[str, Any]:
        it_dir = run_dir / "iterations" / f"{plan.iteration:04d}"
        it_dir.mkdir(parents=True, exist_ok=True)
        t_wall = time.time()
        t = time.monotonic()
        res: dict[str, Any] = {}
        boot: dict[str, Any] = {}
        try:
            boot = self.backend.start(vm, reset=self.reset)
            res = self.backend.race(vm, plan, grace_ms)
        except (InfraError, AgentFailure, AgentLost) as e:
            res = {"infra_error": f"{type(e).__name__}: {e}"}
            if isinstance(e, AgentLost):
                self.backend.close()  # a fresh agent next time
        finally:
            try:
                self.backend.collect(vm, it_dir)  # the serial log is evidence: always kept
            finally:
                self.backend.destroy(vm)
        verdict = classify(res)
        fire = res.get("fire_ns")
        svc = res.get("svc", {})
        offset, guest_offset = fire_offsets(res, plan.service)
        rec: dict[str, Any] = {
            "iteration": plan.iteration,
            "case": case.name,
            "planned_offset_ms": plan.offset_ms,
            "offset_ms": offset,
            "guest_offset_ms": guest_offset,
            "skew_ms": (offset - plan.offset_ms)
            if offset is not None and plan.offset_ms is not None
            else None,
            "servicing_lag_ms": (svc["start_ns"] - svc["request_ns"]) / 1e6 if "start_ns" in svc else None,
            "servicing_ms": (svc["done_ns"] - svc["request_ns"]) / 1e6 if "done_ns" in svc else None,
            "delivery_ms": (
                (res["shutdown"]["t_ns"] - max(fire or 0, svc.get("done_ns", 0))) / 1e6
                if res.get("shutdown") and fire
                else None
            ),
            **verdict.as_dict(),
            "decision": res.get("decision"),
            "ic_at_fire": res.get("ic_at_fire"),
            "strategy": self.strategy,
            "features": res.get("features"),
            "image": plan.image or vm.record()["paravisor"],
            "accel": vm.accel,
            "reset": self.reset,
            "boot_s": boot.get("wall_s"),
            "started": t_wall,
            "duration_s": time.monotonic() - t,
            "dir": str(it_dir),
        }
        if "timeline" in self.pb.collect or verdict.kind != "preserved":
            rec["timeline"] = _timeline(res)
            (it_dir / "timeline.json").write_text(
                json.dumps({"record": rec, "evidence": res}, indent=2, default=str)
            )
        return rec

    def write_calibration(self, accel: str) -> None:
        delays = [
            r["delivery_ms"]
            for r in self.records
            if r.get("delivery_ms") is not None and r["verdict"] in ("preserved", "delivered-before")
        ]
        if delays:
            calibration_path(accel).write_text(
                json.dumps(
                    {
                        "max_delivery_ms": max(delays),
                        "n": len(delays),
                        "time": time.time(),
                        "pid": os.getpid(),
                    }
                )
            )


def rebuild(run_dir: Path) -> tuple[dict[str, Any], int]:
    """``testbed report DIR``: all reports again from results.jsonl alone."""
    summary = write_reports(run_dir)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return summary, exit_code(evaluate(run, read_results(run_dir / "results.jsonl")))
